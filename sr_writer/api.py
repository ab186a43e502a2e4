"""The entry points the node calls: build every result object of one inference run, or build and write them.

:func:`build_result_objects` returns the datasets; :func:`result_file_name` and :func:`encode_result_object` give a
caller that keeps files its own way (the node's outbox, synced) the name and bytes :func:`write_result_objects`
uses, so that each object is encoded and written once.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset

from sr_writer.context import BuildContext, ObjectKind, ResultOptions, repair_patient_module
from sr_writer.findings import InferenceResult
from sr_writer.gsps import build_presentation_states
from sr_writer.sc import build_secondary_captures
from sr_writer.seg import build_segmentations
from sr_writer.sr import build_sr
from sr_writer.uids import ResultUIDs

__all__ = [
    "build_result_objects",
    "encode_result_object",
    "object_kind",
    "result_file_name",
    "write_result_objects",
]

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def build_result_objects(
    result: InferenceResult,
    sources: Sequence[Dataset],
    uids: ResultUIDs,
    options: ResultOptions | None = None,
) -> list[Dataset]:
    """The DICOM result objects of ``result``: SR first, then GSPS, SEG and SC as ``options`` ask.

    ``sources`` are the study's source images as read from disk (pydicom datasets; pixel data is needed only for
    the Secondary Capture). ``uids`` derives every UID from (study, algorithm, profile, run), so calling this twice
    with the same arguments gives objects with the same UIDs (a retry overwrites in the PACS).

    Bad findings never make an invalid object: see :mod:`sr_writer.prepare` for what is clipped, dropped to a
    text-only finding, or sanitised. Raises ``ValueError`` for caller errors: no sources, a source without
    SOP/series/study UIDs or Rows/Columns, or ``uids`` made for another study; and its subclass
    :class:`~sr_writer.prepare.MixedSourcesError` for sources of another study or of more than one patient (Patient
    ID or Issuer of Patient ID differ), so that no object labels one patient's images with another's identity.
    """
    options = options or ResultOptions()
    ctx = BuildContext(result, sources, uids, options)
    objects: list[Dataset] = []
    if options.sr:
        objects.append(build_sr(ctx))
    if options.gsps:
        objects.extend(build_presentation_states(ctx))
    if options.seg:
        objects.extend(build_segmentations(ctx))
    if options.sc:
        objects.extend(build_secondary_captures(ctx))
    first = ctx.sources.datasets[0]
    for obj in objects:
        # Same Patient and Study attributes in every object (dcentvfy compares them across the study); some
        # highdicom constructors copy only a subset. SourceIndex has checked that every source is of this patient.
        if isinstance(obj, hd.SOPClass):
            obj.copy_patient_and_study_information(first)
        repair_patient_module(obj)
    logger.info(
        "built %d result objects for %d findings (%d with geometry)",
        len(objects), len(ctx.findings), len(ctx.findings_with_geometry()),
    )
    return objects


def object_kind(ds: Dataset) -> ObjectKind:
    """Which kind of result object ``ds`` is, from its Modality (SR, PR, SEG, OT)."""
    return {"SR": ObjectKind.SR, "PR": ObjectKind.GSPS, "SEG": ObjectKind.SEG}.get(str(ds.Modality), ObjectKind.SC)


def write_result_objects(
    result: InferenceResult,
    sources: Sequence[Dataset],
    uids: ResultUIDs,
    outdir: str | Path,
    options: ResultOptions | None = None,
) -> list[Path]:
    """Build the result objects and write each to ``outdir/<SOP Instance UID>.dcm`` (DICOM Part 10 files).

    The file name is checked to be a plain UID before it is used as a path. A file is written to a temporary name
    and renamed, so a reader never sees half a file; an existing file of the same UID (a retry) is replaced.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in build_result_objects(result, sources, uids, options):
        name = result_file_name(ds)
        path = outdir / name
        partial = outdir / f".{name}.partial"
        ds.save_as(partial, enforce_file_format=True)
        partial.replace(path)
        paths.append(path)
    return paths


def result_file_name(ds: Dataset) -> str:
    """The file name of a result object: ``<SOP Instance UID>.dcm``, the UID checked to be a plain UID (digits
    and dots, at most 64 characters) before it is used as a path."""
    uid = str(ds.SOPInstanceUID)
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"SOP Instance UID {uid!r} is not a valid UID; refusing to use it as a file name")
    return f"{uid}.dcm"


def encode_result_object(ds: Dataset) -> bytes:
    """``ds`` encoded as a DICOM Part 10 file: the bytes :func:`write_result_objects` writes, for a caller that
    writes them its own way (the node's outbox writes each object once, synced, from memory)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
