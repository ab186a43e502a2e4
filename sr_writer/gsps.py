"""Presentation states with the AI's boxes: what most PACS viewers show.

One presentation state per source image that carries at least one box (:func:`build_presentation_states`).
Each holds, in one graphic layer named for the AI (a CS value: the model name folded to ASCII), a closed 5-point
POLYLINE per box (tracking ID and UID as in the SR) and a short text label anchored at the box's top-left corner:
``"<n> <label>"`` plus the score when the model gave one. Multi-frame sources get one annotation per frame.

* Grayscale sources: Grayscale Softcopy Presentation State. highdicom copies the source's Modality LUT and VOI
  (window centre/width) so the image looks as the radiologist expects.
* Colour sources (RGB, YBR; e.g. ultrasound): Color Softcopy Presentation State with the source's ICC profile
  (sRGB when the source has none). PALETTE COLOR sources are skipped with a logged reason.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections import defaultdict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from sr_writer.context import BuildContext, ObjectKind, copy_image_context, header_view
from sr_writer.prepare import PreparedFinding
from sr_writer.text import LO_MAX, ascii_code_string, single_line

__all__ = ["build_presentation_states", "graphic_label", "layer_name"]

logger = logging.getLogger(__name__)


@functools.cache
def srgb_profile() -> bytes:
    """The sRGB ICC profile highdicom ships, for colour sources that carry none (sRGB is what they almost always
    are). The presentation state IOD needs an input-class profile, which Pillow's built-in sRGB (a monitor
    profile) is not."""
    return (importlib.resources.files("highdicom") / "_icc_profiles" / "sRGB_v4_ICC_preference.icc").read_bytes()


def layer_name(ctx: BuildContext) -> str:
    """The graphic layer's name: ``AI_<MODEL>`` as a code string (16 characters at most)."""
    return ascii_code_string(f"AI {ctx.model_name}", 16)


def graphic_label(finding: PreparedFinding) -> str:
    """The short text drawn next to a box: ``"<n> <label>"`` and ``" (0.87)"`` when a score is known."""
    score = "" if finding.score is None else f" ({finding.score:.2f})"
    return single_line(f"{finding.index} {finding.label}", LO_MAX - len(score)) + score


def _annotation(
    ctx: BuildContext, source: Dataset, frame: int | None, findings: list[PreparedFinding], layer: hd.pr.GraphicLayer
) -> hd.pr.GraphicAnnotation:
    graphics = []
    texts = []
    for f in findings:
        assert f.box is not None
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=np.asarray(f.box.polyline(), dtype=np.float64),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=f.tracking_id,
                tracking_uid=f.tracking_uid,
            )
        )
        texts.append(
            hd.pr.TextObject(
                text_value=graphic_label(f),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(f.box.x0, f.box.y0),
                anchor_point_visible=False,
                tracking_id=f.tracking_id,
                tracking_uid=f.tracking_uid,
            )
        )
    return hd.pr.GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        referenced_frame_number=frame,
        graphic_objects=graphics,
        text_objects=texts,
    )


def build_presentation_states(ctx: BuildContext) -> list[hd.SOPClass]:
    """One GSPS (or Color PS) per source image with at least one box, in source order."""
    by_source: dict[str, list[PreparedFinding]] = defaultdict(list)
    for f in ctx.findings_with_geometry():
        if f.box is not None:
            by_source[str(f.source_uid)].append(f)
    layer = hd.pr.GraphicLayer(
        layer_name=layer_name(ctx),
        order=1,
        description=single_line(f"AI findings: {ctx.model_name} {ctx.software_versions[0]}", LO_MAX),
    )
    states: list[hd.SOPClass] = []
    instance_number = 0
    for source in ctx.sources.datasets:
        findings = by_source.get(str(source.SOPInstanceUID))
        if not findings:
            continue
        photometric = str(source.get("PhotometricInterpretation", ""))
        if photometric == "PALETTE COLOR":
            logger.warning("no presentation state for a PALETTE COLOR source; its boxes stay in the SR only")
            continue
        view = header_view(source)
        frames: dict[int | None, list[PreparedFinding]] = defaultdict(list)
        for f in findings:
            frames[f.frame].append(f)
        annotations = [
            _annotation(ctx, view, frame, frames[frame], layer)
                for frame in sorted(frames, key=lambda k: -1 if k is None else k)
        ]
        instance_number += 1
        kwargs = dict(
            referenced_images=[view],
            series_instance_uid=ctx.series_uid(ObjectKind.GSPS),
            series_number=ctx.series_number(ObjectKind.GSPS),
            sop_instance_uid=ctx.instance_uid(ObjectKind.GSPS, str(source.SOPInstanceUID)),
            instance_number=instance_number,
            manufacturer=ctx.manufacturer,
            manufacturer_model_name=ctx.model_name,
            software_versions=list(ctx.software_versions),
            device_serial_number=ctx.device_serial_number,
            content_label="AI_FINDINGS",
            content_description=single_line(f"AI findings by {ctx.model_name} (unverified)", LO_MAX),
            graphic_annotations=annotations,
            graphic_layers=[layer],
            institution_name=ctx.options.institution_name,
            contributing_equipment=ctx.contributing_equipment(),
            **ctx.common_kwargs(ObjectKind.GSPS),
        )
        state: hd.SOPClass
        if int(source.get("SamplesPerPixel", 1)) == 3:
            if "ICCProfile" not in source and "OpticalPathSequence" not in source:
                kwargs["icc_profile"] = srgb_profile()
            state = hd.pr.ColorSoftcopyPresentationState(**kwargs)  # type: ignore[arg-type]
        else:
            state = hd.pr.GrayscaleSoftcopyPresentationState(**kwargs)  # type: ignore[arg-type]
        copy_image_context(state, source)
        states.append(state)
    return states
