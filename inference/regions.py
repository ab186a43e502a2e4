"""Regions a radiologist marked, read from a presentation state (GSPS) or a structured report (SR SCOORD).

:func:`region_from_dataset` returns the first graphic of a GSPS (Graphic Annotation Sequence, PIXEL units) or the
first SCOORD of an SR as a box in source pixel space with the image it lies on. Both standards put (0.0, 0.0) at
the top-left corner of the top-left pixel, the same convention as :class:`~sr_writer.findings.BoundingBox`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from pydicom.dataset import Dataset

from inference.types import RegionInput
from sr_writer.findings import BoundingBox, ImageRef

__all__ = ["box_from_graphic", "region_from_dataset"]

logger = logging.getLogger(__name__)


def box_from_graphic(graphic_type: str, data: Sequence[float]) -> BoundingBox | None:
    """The bounding box of a graphic given as flat (column, row) pairs; ``None`` when it has no area."""
    values = [float(v) for v in data]
    if len(values) < 2 or len(values) % 2:
        return None
    xs, ys = values[0::2], values[1::2]
    kind = graphic_type.upper()
    if kind == "CIRCLE" and len(xs) >= 2:
        radius = ((xs[1] - xs[0]) ** 2 + (ys[1] - ys[0]) ** 2) ** 0.5
        xs, ys = [xs[0] - radius, xs[0] + radius], [ys[0] - radius, ys[0] + radius]
    elif kind == "POINT":
        return None
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 <= x0 or y1 <= y0:
        return None
    return BoundingBox(x0, y0, x1, y1)


def _image_ref(items: Sequence[Dataset] | None) -> ImageRef | None:
    for item in items or ():
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            frames = item.get("ReferencedFrameNumber")
            frame = int(frames[0] if isinstance(frames, Sequence) and not isinstance(frames, str) else frames or 1)
            return ImageRef(str(uid), max(frame, 1))
    return None


def _gsps_regions(ds: Dataset) -> Iterator[RegionInput]:
    for annotation in ds.get("GraphicAnnotationSequence", ()):
        ref = _image_ref(annotation.get("ReferencedImageSequence"))
        for graphic in annotation.get("GraphicObjectSequence", ()):
            if str(graphic.get("GraphicAnnotationUnits", "PIXEL")).upper() != "PIXEL":
                logger.info("GSPS graphic in DISPLAY units skipped (only PIXEL units are read)")
                continue
            box = box_from_graphic(str(graphic.get("GraphicType", "POLYLINE")), graphic.get("GraphicData", ()))
            if box is not None:
                yield RegionInput(box=box, ref=ref)


def _sr_regions(items: Sequence[Dataset]) -> Iterator[RegionInput]:
    for item in items:
        if item.get("ValueType") == "SCOORD":
            ref = None
            for child in item.get("ContentSequence", ()):
                if child.get("ValueType") == "IMAGE":
                    ref = _image_ref(child.get("ReferencedSOPSequence"))
                    break
            box = box_from_graphic(str(item.get("GraphicType", "POLYLINE")), item.get("GraphicData", ()))
            if box is not None:
                yield RegionInput(box=box, ref=ref)
        yield from _sr_regions(item.get("ContentSequence", ()))


def region_from_dataset(ds: Dataset) -> RegionInput | None:
    """The first marked region of a GSPS or SR dataset, or ``None`` when it has none."""
    if "GraphicAnnotationSequence" in ds:
        return next(_gsps_regions(ds), None)
    if "ContentSequence" in ds:
        return next(_sr_regions(ds.ContentSequence), None)
    return None
