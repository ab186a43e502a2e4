"""Reading a TID 1500 AI report back: as data (:func:`read_findings`) and as text for a quick look (:func:`render_sr`).

Reading is tolerant: anything highdicom can parse as a Measurement Report is shown; items this writer does not
produce are skipped. ``dicom-node render FILE`` prints :func:`render_sr`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sr_writer.findings import BoundingBox, Code
from sr_writer.sr import FREE_TEXT_SCHEME, QUALITATIVE_EVALUATIONS

__all__ = ["ReportedFinding", "SRContents", "read_findings", "read_sr", "render_sr"]

_TRACKING = re.compile(r"^F(\d+): (.*)$", re.DOTALL)


@dataclass(frozen=True)
class ReportedFinding:
    """One finding of the report, as written by :mod:`sr_writer.sr`: a Planar ROI Measurement Group (a finding
    with a box), a TID 1501 Measurement Group (reports written before findings without a region moved), or a
    ``(121071, DCM) Finding`` in Qualitative Evaluations (a finding without a region)."""

    tracking_id: str
    tracking_uid: str
    label: str
    comment: str
    finding_type: Code | None = None
    site: Code | None = None
    box: BoundingBox | None = None
    polyline: tuple[tuple[float, float], ...] = ()
    source_sop_instance_uid: str | None = None
    frame: int | None = None


@dataclass(frozen=True)
class SRContents:
    title: str
    language: str
    device: str
    findings: tuple[ReportedFinding, ...]
    narrative: tuple[tuple[str, str], ...]
    verification: str
    series_description: str


def _code(concept: Dataset | None) -> Code | None:
    if concept is None:
        return None
    value = next((concept.get(k) for k in ("CodeValue", "LongCodeValue", "URNCodeValue") if concept.get(k)), "")
    return Code(str(value), str(concept.CodingSchemeDesignator), str(concept.CodeMeaning))


def _anatomy(site: Code | None) -> Code | None:
    """``site``, or ``None`` for a Finding Site that carries the finding's label as free text (see
    :func:`sr_writer.sr._finding_site`): that is not an anatomic site."""
    if site is None or site.scheme_designator == FREE_TEXT_SCHEME.CodingSchemeDesignator:
        return None
    return site


def _text_items(items: Iterable[Any], name: Any) -> list[str]:
    found = []
    for item in items:
        concept = item.ConceptNameCodeSequence[0]
        if (
            item.ValueType == "TEXT"
            and concept.CodeValue == name.value
            and concept.CodingSchemeDesignator == name.scheme_designator
        ):
            found.append(str(item.TextValue))
    return found


def _reported(group: Any) -> ReportedFinding:
    tracking_id = str(group.tracking_identifier or "")
    match = _TRACKING.match(tracking_id)
    label = match.group(2) if match else tracking_id
    comments = _text_items(group[0].ContentSequence, codes.DCM.Comment)
    sites = group.finding_sites if hasattr(group, "finding_sites") else []
    box = None
    polyline: tuple[tuple[float, float], ...] = ()
    source_uid = None
    frame = None
    roi = getattr(group, "roi", None)
    if roi is not None:
        points = roi.value
        polyline = tuple((float(c), float(r)) for c, r in points)
        xs = [p[0] for p in polyline]
        ys = [p[1] for p in polyline]
        if max(xs) > min(xs) and max(ys) > min(ys):
            box = BoundingBox(min(xs), min(ys), max(xs), max(ys))
        ref = roi.ContentSequence[0].ReferencedSOPSequence[0]
        source_uid = str(ref.ReferencedSOPInstanceUID)
        if "ReferencedFrameNumber" in ref:
            value = ref.ReferencedFrameNumber
            frame = int(value[0] if isinstance(value, list) or (hasattr(value, "__len__") and not isinstance(
                value, str)) else value)
    return ReportedFinding(
        tracking_id=tracking_id,
        tracking_uid=str(group.tracking_uid or ""),
        label=label,
        comment=comments[0] if comments else "",
        finding_type=_code(group.finding_type),
        site=_anatomy(_code(sites[0].value)) if sites else None,
        box=box,
        polyline=polyline,
        source_sop_instance_uid=source_uid,
        frame=frame,
    )


def _is(concept: Dataset, name: Any) -> bool:
    return bool(concept.CodeValue == name.value and concept.CodingSchemeDesignator == name.scheme_designator)


def _tracking_uids(item: Any) -> list[str]:
    """The Tracking Unique Identifiers among the children of ``item``."""
    return [
        str(c.UID) for c in item.get("ContentSequence", [])
        if c.ValueType == "UIDREF" and _is(c.ConceptNameCodeSequence[0], codes.DCM.TrackingUniqueIdentifier)
    ]


def _evaluated(item: Any) -> ReportedFinding | None:
    """A ``(121071, DCM) Finding`` CODE or TEXT item of Qualitative Evaluations as a finding without a region;
    ``None`` for an item that does not carry a Tracking Unique Identifier (not one this writer produced)."""
    children = list(item.get("ContentSequence", []))
    uids = _tracking_uids(item)
    if not uids:
        return None
    tracking = _text_items(children, codes.DCM.TrackingIdentifier)
    tracking_id = tracking[0] if tracking else ""
    match = _TRACKING.match(tracking_id)
    comments = _text_items(children, codes.DCM.Comment)
    sites = [c for c in children if c.ValueType == "CODE" and _is(c.ConceptNameCodeSequence[0], codes.SCT.FindingSite)]
    finding_type = _code(item.ConceptCodeSequence[0]) if item.ValueType == "CODE" else None
    label = match.group(2) if match else (str(item.TextValue) if item.ValueType == "TEXT" else tracking_id)
    return ReportedFinding(
        tracking_id=tracking_id,
        tracking_uid=uids[0],
        label=label,
        comment=comments[0] if comments else "",
        finding_type=finding_type,
        site=_anatomy(_code(sites[0].ConceptCodeSequence[0])) if sites else None,
    )


def read_sr(path_or_dataset: str | PathLike[str] | Dataset) -> SRContents:
    """The report's findings (in document order), narrative and identity, through highdicom."""
    ds = path_or_dataset if isinstance(path_or_dataset, Dataset) else dcmread(Path(path_or_dataset))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report: Any = sr.content
    root: Any = report[0]
    groups: list[Any] = []
    for item in root.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == (
            codes.DCM.ImagingMeasurements.value
        ):
            groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    reported = [_reported(g) for g in groups]
    narrative: list[tuple[str, str]] = []
    box_comments: dict[str, str] = {}
    for item in root.ContentSequence:
        if item.ValueType == "CONTAINER" and _is(item.ConceptNameCodeSequence[0], QUALITATIVE_EVALUATIONS):
            for child in item.get("ContentSequence", []):
                concept = child.ConceptNameCodeSequence[0]
                if child.ValueType in ("CODE", "TEXT") and _is(concept, codes.DCM.Finding):
                    finding = _evaluated(child)
                    if finding is not None:
                        reported.append(finding)
                        continue
                if child.ValueType == "TEXT" and _is(concept, codes.DCM.Comment):
                    uids = _tracking_uids(child)
                    if uids:  # a boxed finding's sentence (sr_writer.sr._box_comment)
                        box_comments.setdefault(uids[0], str(child.TextValue))
                        continue
                if child.ValueType == "TEXT":
                    narrative.append((str(concept.CodeMeaning), str(child.TextValue)))
    reported = [
        replace(f, comment=box_comments[f.tracking_uid]) if not f.comment and f.tracking_uid in box_comments else f
        for f in reported
    ]
    findings = sorted(reported, key=lambda f: _order(f.tracking_id))
    language = ""
    device = ""
    for item in root.ContentSequence:
        meaning = str(item.ConceptNameCodeSequence[0].CodeMeaning)
        if item.ValueType == "CODE" and meaning.startswith("Language of Content"):
            language = str(item.ConceptCodeSequence[0].CodeValue)
        if item.ValueType == "TEXT" and meaning == "Device Observer Name":
            device = str(item.TextValue)
    return SRContents(
        title=str(root.ConceptNameCodeSequence[0].CodeMeaning),
        language=language,
        device=device,
        findings=tuple(findings),
        narrative=tuple(narrative),
        verification=str(ds.get("VerificationFlag", "")),
        series_description=str(ds.get("SeriesDescription", "")),
    )


def read_findings(path_or_dataset: str | PathLike[str] | Dataset) -> list[ReportedFinding]:
    """The findings of a report written by this package, in finding order: those with a region from their
    measurement groups, those without from Qualitative Evaluations."""
    return list(read_sr(path_or_dataset).findings)


def _order(tracking_id: str) -> tuple[int, str]:
    match = _TRACKING.match(tracking_id)
    return (int(match.group(1)) if match else 1 << 30, tracking_id)


def _fmt(value: float) -> str:
    return f"{value:g}"


def render_sr(path_or_dataset: str | PathLike[str] | Dataset) -> str:
    """The report as readable text: header, findings (label, codes, box, source, comment) and narrative."""
    contents = read_sr(path_or_dataset)
    lines = [
        f"{contents.title} [{contents.verification}]",
        f"Series: {contents.series_description}",
        f"Observer device: {contents.device}    Language: {contents.language}",
        "",
        f"Findings ({len(contents.findings)}):",
    ]
    if not contents.findings:
        lines.append("  (none)")
    for f in contents.findings:
        lines.append(f"  {f.tracking_id}")
        if f.finding_type is not None:
            code = f.finding_type
            lines.append(f"    type: {code.meaning} ({code.scheme_designator} {code.value})")
        if f.site is not None:
            lines.append(f"    site: {f.site.meaning} ({f.site.scheme_designator} {f.site.value})")
        if f.box is not None:
            box = ", ".join(_fmt(v) for v in f.box.as_list())
            frame = "" if f.frame is None else f", frame {f.frame}"
            lines.append(f"    box (x0, y0, x1, y1): {box} on {f.source_sop_instance_uid}{frame}")
        else:
            lines.append("    text only (no region)")
        if f.comment:
            lines.append(f"    comment: {f.comment}")
    if contents.narrative:
        lines.append("")
        for name, text in contents.narrative:
            lines.append(f"{name}:")
            lines.extend(f"  {line}" for line in text.splitlines())
    return "\n".join(lines) + "\n"
