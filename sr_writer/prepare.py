"""Checking findings against the source images before any object is built.

:func:`prepare_findings` turns the untrusted findings of an :class:`~sr_writer.findings.InferenceResult` into
:class:`PreparedFinding` objects that every writer can use without further checks. What it does with bad input
(each case is logged at WARNING with the finding's index, never with patient data):

* **unknown source image** (a SOP Instance UID not among the source datasets): the geometry and the mask are
  dropped; the finding is kept as a text-only finding;
* **frame number beyond the source's Number of Frames**: as for an unknown source;
* **box partly outside the image**: clipped to the image (pixel edges ``0..Columns``, ``0..Rows``);
* **coordinates**: rounded to 32-bit floats, the precision of Graphic Data (FL) in SR and GSPS, so what the
  writers record is exactly what a reader gets back;
* **box wholly outside the image, zero area, or narrower/shorter than** ``min_box_pixels`` **after clipping**:
  the box is dropped and the finding is kept as a text-only finding (a mask, if any, still stands);
* **mask of the wrong shape or with no pixel set**: the mask is dropped;
* **a mask without a box**: the box is derived from the mask's extent;
* **codes given by the model** (finding type, site) whose value or scheme is not plain ASCII: dropped (the table
  in :mod:`sr_writer.lexicon` may still code the label); meanings are sanitised and cut to 64 characters;
* **finding site**: the model's site code, else the anatomy the label names (:mod:`sr_writer.lexicon`), else the
  anatomy the sentence names; its laterality from the same words (left, right, bilateral; 左, 右, 双);
* **labels and texts**: sanitised and truncated as described in :mod:`sr_writer.text` (label at most 64
  characters, sentence at most :data:`~sr_writer.text.MAX_UT_CHARS`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from sr_writer.findings import BoundingBox, Code, Finding, InferenceResult
from sr_writer.lexicon import finding_site_for, finding_type_for, laterality_for
from sr_writer.text import LO_MAX, multi_line, single_line
from sr_writer.uids import ResultUIDs

__all__ = ["MixedSourcesError", "PreparedFinding", "SourceIndex", "prepare_findings"]

logger = logging.getLogger(__name__)

_EMPTY_LABEL = "finding"

#: The attributes that tell patients apart (DESIGN invariant 10), with the plural used in messages.
_PATIENT_KEYS = (("PatientID", "Patient IDs"), ("IssuerOfPatientID", "Issuers of Patient ID"))


class MixedSourcesError(ValueError):
    """The source images do not all belong to one patient and one study (DESIGN invariant 10).

    A caller error like the other refusals of :class:`SourceIndex`, and one that no retry can mend: the study has
    to be corrected at its origin. The message names the attribute that differs and the positions of the sources
    in each group, never the values (they are patient data, and the message reaches logs and job records).
    """


def _ranges(positions: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``"0-2, 5, 7-8"``."""
    spans: list[list[int]] = []
    for p in positions:
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _patient_of(ds: Dataset) -> tuple[str, ...]:
    """Patient ID and Issuer of Patient ID as compared: absent and empty are the same (no value); leading and
    trailing spaces are not significant in LO values."""
    return tuple(str(ds.get(keyword) or "").strip() for keyword, _ in _PATIENT_KEYS)


def check_one_patient(sources: Sequence[Dataset]) -> None:
    """Raise :class:`MixedSourcesError` unless every dataset of ``sources`` has the same Patient ID and Issuer of
    Patient ID (an absent one counts as one value: all absent is one patient, absent beside present is two)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for position, ds in enumerate(sources):
        groups.setdefault(_patient_of(ds), []).append(position)
    if len(groups) < 2:
        return
    differing = []
    for index, (_, plural) in enumerate(_PATIENT_KEYS):
        count = len({key[index] for key in groups})
        if count > 1:
            differing.append(f"{count} different {plural}")
    # A group that lacks a value the others have is said to (an absent value is not patient data, and it is the
    # usual cause: one modality that fills the Issuer of Patient ID, another that does not).
    described = []
    for key, positions in groups.items():
        lacks = any(not key[i] and any(other[i] for other in groups) for i in range(len(_PATIENT_KEYS)))
        described.append(_ranges(positions) + (" without one" if lacks else ""))
    raise MixedSourcesError(
        f"sources: {' and '.join(differing)} among {len(sources)} sources (sources {' vs '.join(described)}); "
        "every source image must belong to one patient (one Patient ID and Issuer of Patient ID)"
    )


class SourceIndex:
    """The study's source images by SOP Instance UID, in the order given.

    Raises ``ValueError`` when a dataset lacks the attributes every writer needs, and :class:`MixedSourcesError`
    (a ``ValueError``) when one belongs to another study than ``study_instance_uid`` or the datasets disagree on
    the patient. A SOP Instance UID given twice (an instance received twice) keeps its first dataset; both copies
    must agree on the patient.
    """

    REQUIRED = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
    #: Type 2 attributes of the Patient and General Study modules that highdicom's constructors read from a source
    #: (an image that conforms has them, possibly empty; some real ones lack them, and highdicom then fails with an
    #: AttributeError). A source lacking some is used through a copy of its element table that has them empty.
    TYPE_2_READ = (
        "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
        "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    )

    def __init__(self, sources: Sequence[Dataset], study_instance_uid: str):
        if not sources:
            raise ValueError("sources must hold at least one source image dataset, got none")
        self._by_uid: dict[str, Dataset] = {}
        for position, ds in enumerate(sources):
            missing = [k for k in self.REQUIRED if k not in ds]
            if missing:
                raise ValueError(f"sources[{position}] lacks required attributes {missing}")
            if ds.StudyInstanceUID != study_instance_uid:
                raise MixedSourcesError(
                    f"sources[{position}] belongs to another study than result.study_instance_uid "
                    "(every source image must come from the study the result describes)"
                )
            uid = str(ds.SOPInstanceUID)
            if uid in self._by_uid:
                logger.warning("sources[%d] repeats a SOP Instance UID already given; the first one is used", position)
                continue
            self._by_uid[uid] = self._with_type_2(position, ds)
        check_one_patient(sources)

    def _with_type_2(self, position: int, ds: Dataset) -> Dataset:
        """``ds``, or a new dataset over the same elements (the caller's is not changed) with the Type 2 attributes
        it lacks present and empty."""
        missing = [k for k in self.TYPE_2_READ if k not in ds]
        if not missing:
            return ds
        logger.warning("sources[%d] lacks Type 2 attributes %s; the results carry them empty", position, missing)
        filled = Dataset()
        for element in ds:  # the same element objects: no value (pixel data included) is copied
            filled.add(element)
        if hasattr(ds, "file_meta"):
            filled.file_meta = ds.file_meta
        for keyword in missing:
            setattr(filled, keyword, "")
        return filled

    def get(self, sop_instance_uid: str) -> Dataset | None:
        return self._by_uid.get(sop_instance_uid)

    @property
    def datasets(self) -> list[Dataset]:
        return list(self._by_uid.values())

    def __len__(self) -> int:
        return len(self._by_uid)


def number_of_frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def is_multiframe(ds: Dataset) -> bool:
    return "NumberOfFrames" in ds


@dataclass(frozen=True)
class PreparedFinding:
    """A finding checked against its source image; what every writer consumes.

    ``index`` is 1-based and stable (the position in ``InferenceResult.findings``); ``tracking_uid`` is the same in
    SR, GSPS and SEG. ``box`` is clipped to the image; ``source`` is ``None`` for a text-only finding; ``frame`` is
    the 1-based frame for multi-frame sources and ``None`` for single-frame ones.
    """

    index: int
    label: str
    text: str
    finding_type: Code | None
    site: Code | None
    score: float | None
    tracking_id: str
    tracking_uid: str
    box: BoundingBox | None = None
    source: Dataset | None = field(default=None, repr=False)
    frame: int | None = None
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    notes: tuple[str, ...] = ()
    laterality: Code | None = None

    @property
    def has_geometry(self) -> bool:
        return self.box is not None and self.source is not None

    @property
    def source_uid(self) -> str | None:
        return None if self.source is None else str(self.source.SOPInstanceUID)

    @property
    def comment(self) -> str:
        """The model's sentence, or the label when the model gave none (viewers show the Comment as the label)."""
        return self.text or self.label


_CODE_VALUE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,64}$")  # printable ASCII without backslash
_SCHEME = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")


def checked_code(code: Code | None, index: int, what: str) -> Code | None:
    """``code`` when its value and scheme are DICOM-safe ASCII (SH/UC, CS-like), else ``None`` (logged); the
    meaning is sanitised and cut to 64 characters."""
    if code is None:
        return None
    if not _CODE_VALUE.match(code.value) or not _SCHEME.match(code.scheme_designator):
        logger.warning("finding %d: %s code dropped: value or scheme is not plain ASCII of the allowed length",
                       index, what)
        return None
    meaning = single_line(code.meaning, LO_MAX)
    return code if meaning == code.meaning else Code(code.value, code.scheme_designator, meaning or code.value)


def tracking_identifier(index: int, label: str) -> str:
    """The human-readable Tracking Identifier: ``"F<index>: <label>"`` (unique within the report)."""
    return f"F{index}: {label}"


def _box_from_mask(mask: np.ndarray) -> BoundingBox | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return BoundingBox(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def as_float32(value: float) -> float:
    """``value`` at the precision SR and GSPS store coordinates (Graphic Data is FL, 32-bit)."""
    return float(np.float32(value))


def _checked_box(box: BoundingBox, columns: int, rows: int, min_size: float) -> tuple[BoundingBox | None, str]:
    values = (box.x0, box.y0, box.x1, box.y1)
    if not all(math.isfinite(v) for v in values):
        return None, f"box coordinates are not finite: {values}"
    if not (box.x1 > box.x0 and box.y1 > box.y0):
        return None, f"box has zero or negative area: {values}"
    x0, x1 = max(0.0, min(box.x0, columns)), max(0.0, min(box.x1, columns))
    y0, y1 = max(0.0, min(box.y0, rows)), max(0.0, min(box.y1, rows))
    if x1 - x0 < min_size or y1 - y0 < min_size:
        return None, f"box {values} has less than {min_size} pixel inside the {columns}x{rows} image"
    clipped = BoundingBox(*(as_float32(v) for v in (x0, y0, x1, y1)))
    if (x0, y0, x1, y1) != values:
        return clipped, f"box {values} clipped to the {columns}x{rows} image"
    return clipped, ""


def _prepare_one(
    index: int, finding: Finding, sources: SourceIndex, uids: ResultUIDs, min_box_pixels: float
) -> PreparedFinding:
    label = single_line(finding.label, LO_MAX) or _EMPTY_LABEL
    text = multi_line(finding.text)
    notes: list[str] = []
    box: BoundingBox | None = None
    source: Dataset | None = None
    frame: int | None = None
    mask: np.ndarray | None = None

    if finding.source is not None:
        source = sources.get(finding.source.sop_instance_uid)
        if source is None:
            notes.append("source image is not among the study's source images; geometry dropped")
        elif finding.source.frame_number > number_of_frames(source):
            notes.append(
                f"frame {finding.source.frame_number} is beyond the source's {number_of_frames(source)} frames; "
                "geometry dropped"
            )
            source = None
        else:
            frame = finding.source.frame_number if is_multiframe(source) else None

    if source is not None:
        rows, columns = int(source.Rows), int(source.Columns)
        if finding.mask is not None:
            candidate = np.asarray(finding.mask).astype(bool, copy=False)
            if candidate.shape != (rows, columns):
                notes.append(f"mask shape {candidate.shape} differs from the image ({rows}, {columns}); mask dropped")
            elif not candidate.any():
                notes.append("mask has no pixel set; mask dropped")
            else:
                mask = candidate
        raw_box = finding.box if finding.box is not None else (None if mask is None else _box_from_mask(mask))
        if raw_box is not None:
            box, note = _checked_box(raw_box, columns, rows, min_box_pixels)
            if note:
                notes.append(note)
        if box is None and mask is None:
            source, frame = None, None

    for note in notes:
        logger.warning("finding %d: %s", index, note)

    site = checked_code(finding.site, index, "site")
    site_words = f"{finding.label}\n{text}"
    if site is None:
        for words in (finding.label, text):
            site = finding_site_for(words)
            if site is not None:
                site_words = words
                break

    return PreparedFinding(
        index=index,
        label=label,
        text=text,
        finding_type=checked_code(finding.code, index, "finding type") or finding_type_for(finding.label),
        site=site,
        laterality=None if site is None else laterality_for(site_words),
        score=finding.score,
        tracking_id=tracking_identifier(index, label),
        tracking_uid=uids.uid("finding", index),
        box=box,
        source=source,
        frame=frame,
        mask=mask,
        notes=tuple(notes),
    )


def prepare_findings(
    result: InferenceResult, sources: SourceIndex, uids: ResultUIDs, min_box_pixels: float = 1.0
) -> list[PreparedFinding]:
    """Every finding of ``result`` checked against ``sources`` (see the module docstring for the rules)."""
    if min_box_pixels <= 0:
        raise ValueError(f"min_box_pixels must be positive, got {min_box_pixels}")
    return [
        _prepare_one(index, finding, sources, uids, min_box_pixels)
        for index, finding in enumerate(result.findings, start=1)
    ]
