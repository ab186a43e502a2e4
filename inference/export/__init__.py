"""ONNX exports of the model families, for the onnxruntime and tensorrt backends.

:mod:`~inference.export.manifest` (no heavy imports): where an export lives, what it records, whether it fits the
checkpoint. :mod:`~inference.export.modules` (torch): the modules exported as graphs. :mod:`~inference.export.exporter`
(torch, onnx): ``dicom-node model export``. :mod:`~inference.export.tensorrt_build`: TensorRT engines from the graphs.
"""

from inference.export.manifest import (
    EXPORT_COMMAND,
    ExportManifest,
    ExportMissingError,
    ExportUnsupportedError,
    export_folder,
    find_export,
)

__all__ = [
    "EXPORT_COMMAND",
    "ExportManifest",
    "ExportMissingError",
    "ExportUnsupportedError",
    "export_folder",
    "find_export",
]
