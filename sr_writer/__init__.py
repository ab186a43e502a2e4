"""DICOM result objects (TID 1500 SR, GSPS, SEG, Secondary Capture) from grounded findings, through highdicom.

Importing this package is cheap: the findings contract is plain Python and numpy; the writers (and highdicom)
are imported when first used, through :func:`build_result_objects`, :func:`write_result_objects` and
:func:`render_sr`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from sr_writer.kinds import ObjectKind
from sr_writer.uids import ResultUIDs

if TYPE_CHECKING:
    from sr_writer.api import build_result_objects, write_result_objects
    from sr_writer.context import ResultOptions
    from sr_writer.prepare import MixedSourcesError
    from sr_writer.render import read_findings, render_sr

__all__ = [
    "AlgorithmIdentity",
    "BoundingBox",
    "Code",
    "Finding",
    "ImageRef",
    "InferenceResult",
    "Language",
    "MixedSourcesError",
    "ObjectKind",
    "Report",
    "ResultOptions",
    "ResultUIDs",
    "build_result_objects",
    "read_findings",
    "render_sr",
    "result_uid",
    "write_result_objects",
]

_LAZY = {
    "build_result_objects": "sr_writer.api",
    "write_result_objects": "sr_writer.api",
    "MixedSourcesError": "sr_writer.prepare",
    "ResultOptions": "sr_writer.context",
    "read_findings": "sr_writer.render",
    "render_sr": "sr_writer.render",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sr_writer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
