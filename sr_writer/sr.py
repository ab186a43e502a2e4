"""TID 1500 Measurement Report in a Comprehensive 3D SR (the IHE AI Results object).

Content tree (highdicom builds every item; nothing is assembled by hand):

* ``(126000, DCM) Imaging Measurement Report`` (TID 1500)

  * Language of Content (TID 1204): ``en`` or ``zh`` (RFC 5646)
  * Observation context: the observer is a *device* (the algorithm, its device UID, name, manufacturer, model)
  * Procedure Reported: the imaging procedure of the source modality (never the algorithm), from CID 100 as TID
    1500 asks (CT and MRI "unspecified body region", otherwise "Imaging procedure"); the source's own Procedure
    Code Sequence goes to the document's Performed Procedure Code Sequence, where any code may stand
  * Image Library: the source images the findings' regions lie on (every source image with
    ``ResultOptions.library_all_sources``, or when no finding has a region), with the general TID 1602
    descriptors
  * ``(126010, DCM) Imaging Measurements``, one TID 1410 Planar ROI group per finding with a box: Tracking
    Identifier ``"F<n>: <label>"`` and Tracking UID, Finding Type (coded from :mod:`sr_writer.lexicon` or the
    finding's own code; absent for an uncoded label), one Finding Site (see :func:`_finding_site`), Algorithm
    Identification (TID 4019: name, version, parameters) and the box as a closed 5-point POLYLINE. Nothing else:
    TID 1410 has no row for free text, and PixelMed's TID 1500 validator flags the items it does not know there
    (Algorithm Manufacturer: the manufacturer is in the device observer context and the header instead; Geometric
    Purpose of Region: optional, and a POLYLINE Image Region is the region itself without it).

  * ``(C0034375, UMLS) Qualitative Evaluations`` (TID 1500 row 12) with the narrative as TEXT ``(121070, DCM)
    Findings`` and ``(121073, DCM) Impression``, then one qualitative evaluation per finding *without* a region (no
    box, or its geometry rejected by :mod:`sr_writer.prepare`); see :func:`_evaluation`; then the model's sentence on
    each boxed finding as ``(121106, DCM) Comment`` TEXT (TID 1500 row 14) tied to its group by Tracking Identifier
    and Tracking Unique Identifier; see :func:`_box_comment`.

    A study whose findings all lack a region, or that has no finding, has no Imaging Measurements container (TID
    1500 needs one of its rows 6, 10 or 12, and row 12 is there); without any finding, the Findings text says
    that the algorithm found nothing, and so does the SR's Series Description (the one text of such a report that
    every viewer lists, OHIF included: OHIF 3.13 shows a TID 1500 report only through its measurement groups).
    An empty Imaging Measurements container would not help: OHIF 3.13's loader reads a missing container and an
    empty one alike (no measurement, no error) and its SR viewport stays empty either way; TID 1500 wants the
    container, when present, to hold at least one group.

PixelMed's ``DicomSRValidator`` reports no error on these reports. It still warns about the children of the
Qualitative Evaluations items (Tracking Identifier, Tracking Unique Identifier, Finding Site and Comment under a
Finding, the tracking items under a box's Comment): TID 1500 rows 13-14 name the evaluation item and no children,
while the template is extensible and the Comprehensive 3D SR IOD allows these relationships; they keep each finding
and sentence tied to its Tracking UID (the one shared with the GSPS and SEG), so they stay. A Finding Site's Code
Meaning is in the language of the report (what OHIF draws next to the box); its Laterality keeps the CID 244
meaning, which PixelMed checks.

The document is PARTIAL, PRELIMINARY and UNVERIFIED: an AI result awaits a radiologist.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sr_writer.context import BuildContext, ObjectKind, repair_patient_module
from sr_writer.findings import Code, Language
from sr_writer.lexicon import localized
from sr_writer.prepare import PreparedFinding
from sr_writer.text import multi_line

__all__ = ["FREE_TEXT_SCHEME", "NO_FINDINGS_SERIES", "NO_FINDINGS_TEXT", "QUALITATIVE_EVALUATIONS", "build_sr"]

logger = logging.getLogger(__name__)

QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NO_FINDINGS_TEXT = {
    Language.ENGLISH: "No findings were reported by the AI algorithm.",
    Language.CHINESE: "AI 算法未报告任何发现。",
}
#: What the SR's Series Description says, after the title, when the result has no finding at all.
NO_FINDINGS_SERIES = {
    Language.ENGLISH: "no findings",
    Language.CHINESE: "未见异常",
}
#: The free-text code OHIF and Cornerstone write and read as a measurement's label: (CORNERSTONEFREETEXT,
#: CORNERSTONEJS, <label>). OHIF 3.13 draws next to a box only its NUM values and its Finding Site's Code Meaning;
#: a boxed finding whose anatomy is not known carries its label as a Finding Site in this code, as OHIF's own SRs
#: do. Its scheme is declared in the Coding Scheme Identification Sequence (PS3.3 C.12.1.1.3: a designator not in
#: PS3.16 Table 8-1).
FREE_TEXT_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator="CORNERSTONEJS",
    name="Cornerstone.js free text (OHIF measurement labels)",
    responsible_organization="Open Health Imaging Foundation (OHIF)",
)
_FREE_TEXT_VALUE = "CORNERSTONEFREETEXT"
_LANGUAGES = {
    Language.ENGLISH: hd.sr.CodedConcept("en", "RFC5646", "English"),
    Language.CHINESE: hd.sr.CodedConcept("zh", "RFC5646", "Chinese"),
}
#: Procedure Reported by source modality, from CID 100 (Quantitative Diagnostic Imaging Procedures), the value set
#: TID 1500 row 4 names; a modality CID 100 has no code for is an "Imaging procedure".
_PROCEDURES = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
}


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning[:64])


def _procedures(ctx: BuildContext) -> list[hd.sr.CodedConcept]:
    """Procedure Reported: one CID 100 procedure per source modality (see :data:`_PROCEDURES`)."""
    found: dict[tuple[str, str], hd.sr.CodedConcept] = {}
    for ds in ctx.sources.datasets:
        code = _PROCEDURES.get(str(ds.get("Modality", "")), codes.cid100.ImagingProcedure)
        found.setdefault((code.value, code.scheme_designator), hd.sr.CodedConcept.from_code(code))
    return list(found.values())


def _performed_procedures(ctx: BuildContext) -> list[hd.sr.CodedConcept] | None:
    """The sources' Procedure Code Sequence items (the study's own procedure codes, of any scheme) for the SR's
    Performed Procedure Code Sequence; items that are not valid codes are skipped."""
    found: dict[tuple[str, str], hd.sr.CodedConcept] = {}
    for ds in ctx.sources.datasets:
        for item in ds.get("ProcedureCodeSequence", []):
            try:
                concept = hd.sr.CodedConcept.from_dataset(item)
            except (AttributeError, ValueError, TypeError):
                continue
            found.setdefault((concept.value, concept.scheme_designator), concept)
    return list(found.values()) or None


def _library_view(ds: Dataset) -> Dataset:
    """The attributes of ``ds`` that the Image Library entry needs (no pixel data).

    Entries carry the general TID 1602 descriptors: Modality (coded from the SOP Class), Frame of Reference UID,
    Rows and Columns. The optional modality-specific descriptors (TID 1603/1604: spacing, position, orientation)
    are left out on purpose: highdicom reads them without checking they exist (a CR without Imager Pixel
    Spacing, an enhanced MR with its geometry in functional groups fail), and they double the cost of a report
    on a large series while the referenced images carry the same facts. The view presents itself as modality
    ``OT`` so that highdicom skips them; the coded Modality item still comes from the SOP Class and stays right.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    view.Modality = "OT"
    return view


def _library_images(ctx: BuildContext) -> list[Dataset]:
    """The Image Library's images: those a finding's region lies on (DICOM's purpose for the library), or every
    source image when ``ResultOptions.library_all_sources`` is set or no finding has a region. Every source image
    is referenced in the Current Requested Procedure Evidence Sequence either way."""
    located = {f.source_uid for f in ctx.findings if f.has_geometry}
    if ctx.options.library_all_sources or not located:
        return ctx.sources.datasets
    return [ds for ds in ctx.sources.datasets if str(ds.SOPInstanceUID) in located]


def _algorithm_id(ctx: BuildContext) -> hd.sr.AlgorithmIdentification:
    algorithm = ctx.result.algorithm
    parameters = [
        multi_line(f"{key}={value}") for key, value in sorted(algorithm.parameters.items())
    ] or None
    return hd.sr.AlgorithmIdentification(
        name=multi_line(f"{algorithm.name} ({algorithm.family})"),
        version=multi_line(algorithm.version),
        parameters=parameters,
    )


_Group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations


def _finding_site(ctx: BuildContext, finding: PreparedFinding) -> hd.sr.FindingSite:
    """The Finding Site of a boxed finding: what OHIF 3.13 writes next to the box.

    The anatomy the model named (:mod:`sr_writer.prepare`), with its laterality where the words give one, its
    meaning in the report's language (:func:`sr_writer.lexicon.localized`); otherwise the finding's label as OHIF's
    own free-text code (:data:`FREE_TEXT_SCHEME`), which OHIF draws and also reads back as the label when a user
    takes the report's measurements over.
    """
    language = ctx.result.language
    if finding.site is not None:
        laterality = None if finding.laterality is None else _coded(finding.laterality)
        return hd.sr.FindingSite(anatomic_location=_coded(localized(finding.site, language)), laterality=laterality)
    return hd.sr.FindingSite(
        anatomic_location=hd.sr.CodedConcept(_FREE_TEXT_VALUE, FREE_TEXT_SCHEME.CodingSchemeDesignator, finding.label)
    )


def _group(ctx: BuildContext, finding: PreparedFinding) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 Measurement Group of a finding with a region (OHIF draws it from its SCOORD)."""
    tracking = hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.tracking_id)
    finding_type = None if finding.finding_type is None else _coded(finding.finding_type)
    assert finding.box is not None and finding.source is not None, "a finding without a region has no group"
    source = finding.source
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(finding.box.polyline(), dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            referenced_frame_numbers=None if finding.frame is None else [finding.frame],
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=finding_type,
        algorithm_id=_algorithm_id(ctx),
        finding_sites=[_finding_site(ctx, finding)],
    )


def _tracking_items(finding: PreparedFinding) -> list[hd.sr.ContentItem]:
    """Tracking Identifier and Tracking Unique Identifier (HAS OBS CONTEXT, as in TID 1501) of ``finding``."""
    relationship = hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT
    return [
        hd.sr.TextContentItem(
            name=codes.DCM.TrackingIdentifier, value=finding.tracking_id, relationship_type=relationship
        ),
        hd.sr.UIDRefContentItem(
            name=codes.DCM.TrackingUniqueIdentifier, value=finding.tracking_uid, relationship_type=relationship
        ),
    ]


def _box_comment(finding: PreparedFinding) -> hd.sr.TextContentItem:
    """The model's sentence on a boxed finding, as a TEXT qualitative evaluation of the report (TID 1500 row 14),
    with the group's Tracking Identifier and Tracking Unique Identifier as its observation context (the same
    values as in the Measurement Group, which is how :func:`sr_writer.render.read_sr` joins them)."""
    item = hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=finding.comment, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    item.ContentSequence = hd.sr.ContentSequence(_tracking_items(finding))
    return item


def _evaluation(finding: PreparedFinding) -> hd.sr.CodeContentItem | hd.sr.TextContentItem:
    """A finding without an image region as a qualitative evaluation of the report (TID 1500 row 12).

    Why not a TID 1501 Measurement Group, as TID 1500 would also allow: OHIF v3 draws every Measurement Group from
    its SCOORD (or a NUM inferred from one); a group with neither makes its SR loader throw, and the whole SR
    viewport stays blank, the other findings' boxes included. TID 1500 puts evaluations of the images as a whole
    in its Qualitative Evaluations container (rows 12-14: CODE or TEXT items of any concept), which OHIF's loader
    does not walk; the narrative is there already.

    The item is ``(121071, DCM) Finding``: CODE with the finding type when the finding is coded, else TEXT with
    the label. Its children (TID 1500 is extensible; the relationships are those the Comprehensive 3D SR IOD
    allows from a CODE or TEXT item) carry what TID 1501 would have: Tracking Identifier and Tracking Unique
    Identifier (HAS OBS CONTEXT, as in TID 1501), Finding Site (HAS CONCEPT MOD) and the model's sentence as
    ``(121106, DCM) Comment`` (HAS PROPERTIES). :func:`sr_writer.render.read_sr` reads it back as a finding.
    """
    relationship = hd.sr.RelationshipTypeValues
    item: hd.sr.CodeContentItem | hd.sr.TextContentItem
    if finding.finding_type is not None:
        item = hd.sr.CodeContentItem(
            name=codes.DCM.Finding, value=_coded(finding.finding_type), relationship_type=relationship.CONTAINS
        )
    else:
        item = hd.sr.TextContentItem(
            name=codes.DCM.Finding, value=finding.label, relationship_type=relationship.CONTAINS
        )
    children = _tracking_items(finding)
    if finding.site is not None:
        children.append(
            hd.sr.CodeContentItem(
                name=codes.SCT.FindingSite, value=_coded(finding.site), relationship_type=relationship.HAS_CONCEPT_MOD
            )
        )
    children.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=finding.comment, relationship_type=relationship.HAS_PROPERTIES
        )
    )
    item.ContentSequence = hd.sr.ContentSequence(children)
    return item


def _narrative(ctx: BuildContext) -> hd.sr.ContainerContentItem:
    """The Qualitative Evaluations container: the narrative, then the findings without a region."""
    report = ctx.result.report
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence()
    findings_text = multi_line(report.findings)
    if not ctx.findings and not findings_text:
        findings_text = NO_FINDINGS_TEXT[ctx.result.language]
    for name, value in ((codes.DCM.Findings, findings_text), (codes.DCM.Impression, multi_line(report.impression))):
        if value:
            container.ContentSequence.append(
                hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            )
    container.ContentSequence.extend(_evaluation(f) for f in ctx.findings if not f.has_geometry)
    container.ContentSequence.extend(_box_comment(f) for f in ctx.findings if f.has_geometry)
    return container


def build_sr(ctx: BuildContext) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``ctx`` (see the module docstring for the content tree)."""
    algorithm = ctx.result.algorithm
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=ctx.model_name,
            manufacturer_name=ctx.manufacturer,
            model_name=ctx.model_name,
        ),
    )
    groups: list[_Group] = [_group(ctx, f) for f in ctx.findings if f.has_geometry]
    placeholder = not groups
    if placeholder:
        # highdicom insists on one group; the container is removed below (TID 1500 row 6 is optional when
        # Qualitative Evaluations are present, and they always are: see _narrative).
        groups = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=ctx.uids.uid("finding", 0), identifier="none")
            )
        ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedures(ctx),
        imaging_measurements=groups,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            _LANGUAGES[ctx.result.language]
        ),
        referenced_images=[_library_view(ds) for ds in _library_images(ctx)],
    )
    root = report[0]
    if placeholder:
        measurements = [
            i for i, item in enumerate(root.ContentSequence)
            if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
        ]
        for i in reversed(measurements):
            del root.ContentSequence[i]
    root.ContentSequence.append(_narrative(ctx))

    sources = ctx.sources.datasets
    kwargs = ctx.common_kwargs(ObjectKind.SR)
    if not ctx.findings:
        kwargs["series_description"] = ctx.series_description(ObjectKind.SR, NO_FINDINGS_SERIES[ctx.result.language])
    if any(f.site is None for f in ctx.findings if f.has_geometry):
        kwargs["coding_schemes"] = [FREE_TEXT_SCHEME]
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=ctx.series_uid(ObjectKind.SR),
        series_number=ctx.series_number(ObjectKind.SR),
        sop_instance_uid=ctx.instance_uid(ObjectKind.SR),
        instance_number=1,
        manufacturer=ctx.manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=ctx.options.institution_name,
        contributing_equipment=ctx.contributing_equipment(),
        manufacturer_model_name=ctx.model_name,
        software_versions=list(ctx.software_versions),
        device_serial_number=ctx.device_serial_number,
        performed_procedure_codes=_performed_procedures(ctx),
        **kwargs,  # type: ignore[arg-type]
    )
    repair_patient_module(sr)
    logger.debug("SR built: %d findings, %d with geometry", len(ctx.findings), len(ctx.findings_with_geometry()))
    return sr
