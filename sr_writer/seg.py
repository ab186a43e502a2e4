"""Binary DICOM Segmentations of the findings' masks (and, optionally, of their boxes).

:func:`build_segmentations` groups the findings that carry a region by what highdicom can put into one SEG:

* sources with a patient coordinate system (CT, MR: Frame of Reference and plane position): one SEG per source
  series, or per multi-frame image, whose frames reference the right source images/frames;
* sources without one (CR, DX, single-frame US): one SEG per source image (highdicom allows a single source
  frame there);
* multi-frame sources without a Frame of Reference (cine ultrasound): no SEG (highdicom 0.28 cannot reference
  several frames of such an image); logged, the boxes stay in SR, GSPS and SC.

One segment per finding: label = the finding's label, property type = its finding type (``Finding`` when
uncoded), category "Morphologically abnormal structure", the algorithm identified as AI, tracking ID/UID as in
the SR. Empty frames are kept (OHIF misaligns SEGs whose empty frames were omitted). A cross-sectional source
that lacks the Frame of Reference UID its IOD requires gets a deterministic one derived from its series, so the
SEG stays valid; the plane positions still come from the source.

With ``ResultOptions.seg_boxes`` a finding without a mask contributes its box, filled: a pixel belongs to the box
when its centre (column + 0.5, row + 0.5) lies inside.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sr_writer.context import BuildContext, ObjectKind, copy_image_context, header_view
from sr_writer.findings import BoundingBox
from sr_writer.prepare import PreparedFinding, is_multiframe, number_of_frames
from sr_writer.sr import _coded
from sr_writer.text import LO_MAX, single_line

__all__ = ["box_mask", "build_segmentations"]

logger = logging.getLogger(__name__)

_CROSS_SECTIONAL_SOP_CLASSES_NEED_FOR = ("CT", "MR", "PT")


def box_mask(box: BoundingBox, rows: int, columns: int) -> np.ndarray:
    """The pixels whose centres lie inside ``box``, as a boolean (rows, columns) array."""
    mask = np.zeros((rows, columns), dtype=bool)
    c0, c1 = max(0, math.ceil(box.x0 - 0.5)), min(columns, math.ceil(box.x1 - 0.5))
    r0, r1 = max(0, math.ceil(box.y0 - 0.5)), min(rows, math.ceil(box.y1 - 0.5))
    mask[r0:r1, c0:c1] = True
    return mask


def _has_patient_coordinates(ds: Dataset) -> bool:
    return hd.spatial.get_image_coordinate_system(ds) is not None


def _metadata_view(ds: Dataset, ctx: BuildContext) -> Dataset:
    """``ds`` without its pixel data (highdicom needs only the header), with a derived Frame of Reference UID
    when a cross-sectional source lacks the one its IOD requires."""
    view = header_view(ds)
    if (
        "FrameOfReferenceUID" not in ds
        and str(ds.get("Modality", "")) in _CROSS_SECTIONAL_SOP_CLASSES_NEED_FOR
        and "ImagePositionPatient" in ds
    ):
        view.FrameOfReferenceUID = ctx.uids.uid("frame-of-reference", str(ds.SeriesInstanceUID))
        logger.warning("source series has no Frame of Reference UID; the SEG uses one derived from the series")
    return view


def _region(f: PreparedFinding, rows: int, columns: int, with_boxes: bool) -> np.ndarray | None:
    if f.mask is not None:
        return f.mask
    if with_boxes and f.box is not None:
        return box_mask(f.box, rows, columns)
    return None


def _segment(ctx: BuildContext, number: int, f: PreparedFinding) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=single_line(f.label, LO_MAX),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Finding if f.finding_type is None else _coded(f.finding_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ctx.model_name,
            family=codes.cid7162.ArtificialIntelligence,
            version=ctx.software_versions[0],
        ),
        tracking_uid=f.tracking_uid,
        tracking_id=f.tracking_id,
        anatomic_regions=None if f.site is None else [_coded(f.site)],
    )


def build_segmentations(ctx: BuildContext) -> list[hd.seg.Segmentation]:
    """The SEGs of ``ctx`` (see the module docstring); none when no finding has a region."""
    with_boxes = ctx.options.seg_boxes
    groups: dict[tuple[str, ...], list[PreparedFinding]] = defaultdict(list)
    for f in ctx.findings_with_geometry() + [x for x in ctx.findings if x.mask is not None and not x.has_geometry]:
        source = f.source
        if source is None:
            continue
        if f.mask is None and not (with_boxes and f.box is not None):
            continue
        if is_multiframe(source) and not _has_patient_coordinates(source) and number_of_frames(source) > 1:
            logger.warning("finding %d: no SEG for a multi-frame source without a frame of reference", f.index)
            continue
        if is_multiframe(source) or not _has_patient_coordinates(_metadata_view_key(source)):
            key: tuple[str, ...] = ("image", str(source.SOPInstanceUID))
        else:
            key = ("series", str(source.SeriesInstanceUID))
        groups[key].append(f)

    segs: list[hd.seg.Segmentation] = []
    order = {str(ds.SOPInstanceUID): i for i, ds in enumerate(ctx.sources.datasets)}
    for instance_number, (key, findings) in enumerate(
        sorted(groups.items(), key=lambda kv: min(order[str(f.source_uid)] for f in kv[1])), start=1
    ):
        findings.sort(key=lambda f: f.index)
        first = findings[0].source
        assert first is not None
        rows, columns = int(first.Rows), int(first.Columns)
        if key[0] == "image" and is_multiframe(first):
            sources = [first]
            n_planes = number_of_frames(first)
            plane_of = {f.index: (f.frame or 1) - 1 for f in findings}
        else:
            uids = {str(f.source_uid) for f in findings}
            sources = [ds for ds in ctx.sources.datasets if str(ds.SOPInstanceUID) in uids]
            n_planes = len(sources)
            position = {str(ds.SOPInstanceUID): i for i, ds in enumerate(sources)}
            plane_of = {f.index: position[str(f.source_uid)] for f in findings}
        pixels = np.zeros((n_planes, rows, columns, len(findings)), dtype=bool)
        for s, f in enumerate(findings):
            region = _region(f, rows, columns, with_boxes)
            assert region is not None
            pixels[plane_of[f.index], :, :, s] = region
        seg = hd.seg.Segmentation(
            source_images=[_metadata_view(ds, ctx) for ds in sources],
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment(ctx, n, f) for n, f in enumerate(findings, start=1)],
            series_instance_uid=ctx.series_uid(ObjectKind.SEG),
            series_number=ctx.series_number(ObjectKind.SEG),
            sop_instance_uid=ctx.instance_uid(ObjectKind.SEG, *key),
            instance_number=instance_number,
            manufacturer=ctx.manufacturer,
            manufacturer_model_name=ctx.model_name,
            software_versions=list(ctx.software_versions),  # type: ignore[arg-type]
            device_serial_number=ctx.device_serial_number,
            content_label="AI_REGIONS",
            content_description=single_line(f"AI regions by {ctx.model_name} (unverified)", LO_MAX),
            omit_empty_frames=False,
            contributing_equipment=ctx.contributing_equipment(),
            **ctx.common_kwargs(ObjectKind.SEG),  # type: ignore[arg-type]
        )
        copy_image_context(seg, first, laterality=False)
        if "FrameOfReferenceUID" not in seg:
            # General Image Patient Orientation (Type 2C) is required without a frame of reference.
            seg.PatientOrientation = first.get("PatientOrientation") or ""
        segs.append(seg)
    return segs


def _metadata_view_key(ds: Dataset) -> Dataset:
    """What decides grouping: a cross-sectional source missing its Frame of Reference still has coordinates."""
    if "FrameOfReferenceUID" not in ds and "ImagePositionPatient" in ds:
        return _with_placeholder_for(ds)
    return ds


def _with_placeholder_for(ds: Dataset) -> Dataset:
    view = Dataset()
    view.FrameOfReferenceUID = "1.2"
    view.ImagePositionPatient = ds.ImagePositionPatient
    return view
