"""From DICOM pixels to grounded findings: preprocessing, task profiles, model adapters and backends.

Importing this package must stay cheap: torch, transformers and TensorRT are imported only inside a worker
process, when a model is loaded.
"""
