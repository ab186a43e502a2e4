"""DICOM result objects (TID 1500 SR, GSPS, SEG, Secondary Capture) from grounded findings, through highdicom.

Importing this package is cheap: the findings contract is plain Python and numpy; the writers import highdicom
when first used.
"""

from sr_writer.findings import (
    AlgorithmIdentity,
    BoundingBox,
    Code,
    Finding,
    ImageRef,
    InferenceResult,
    Language,
    Report,
    result_uid,
)

__all__ = [
    "AlgorithmIdentity",
    "BoundingBox",
    "Code",
    "Finding",
    "ImageRef",
    "InferenceResult",
    "Language",
    "Report",
    "result_uid",
]
