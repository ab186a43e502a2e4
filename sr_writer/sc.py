"""Secondary Capture images with the AI's boxes burned in, for viewers that show nothing but images.

One SC per source image (per frame for multi-frame sources) that carries a box. The picture is the source frame
as a radiologist would see it (Modality LUT, then the source's first window, or the 0.5-99.5 percentile range
when it has none; MONOCHROME1 inverted; colour sources as RGB; PALETTE COLOR through its palette), 8-bit RGB, with:

* each box drawn as a rectangle on its pixel edges and its label (``"<n> <label>"``, as in the GSPS) above it;
* a banner across the top: ``AI OUTPUT - <model> <version> - NOT VERIFIED``.

The object says the same in words: Burned In Annotation YES, Image Type DERIVED/SECONDARY, Series Description
and Image Comments naming the AI, Source Image Sequence pointing at the source frame. Text is drawn with a CJK
capable TrueType font when one is installed (Droid Sans Fallback, Noto CJK, WenQuanYi) and ASCII with DejaVu Sans
(or Pillow's built-in font); without a CJK font, non-ASCII characters are drawn as ``?`` in the picture only (the
object's own attributes keep the exact text).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

from sr_writer.context import BuildContext, ObjectKind, copy_image_context
from sr_writer.gsps import graphic_label
from sr_writer.prepare import PreparedFinding, is_multiframe
from sr_writer.text import single_line

__all__ = ["build_secondary_captures", "render_frame"]

logger = logging.getLogger(__name__)

_LATIN_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSansMono-Regular.ttf",
)
_CJK_FONTS = (
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
)
_BOX_COLOUR = (255, 255, 0)
_TEXT_BACKGROUND = (0, 0, 0)
_BIPED = {"A", "P", "R", "L", "H", "F"}

FontType = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _first_font(candidates: tuple[str, ...], size: int) -> FontType | None:
    for candidate in candidates:
        if Path(candidate).is_file():
            try:
                return ImageFont.truetype(candidate, size)
            except OSError:
                continue
    return None


@functools.cache
def _fonts(size: int) -> tuple[FontType, FontType | None]:
    """(font for ASCII text, font for other text or ``None`` when no CJK font is installed)."""
    latin = _first_font(_LATIN_FONTS, size) or ImageFont.load_default(size)
    return latin, _first_font(_CJK_FONTS, size)


def _runs(text: str, size: int) -> list[tuple[str, FontType]]:
    """``text`` split into runs drawn with one font each; undrawable characters become ``?``."""
    latin, cjk = _fonts(size)
    runs: list[tuple[str, FontType]] = []
    for ch in text:
        font = latin if ch.isascii() or cjk is None else cjk
        if cjk is None and not ch.isascii():
            ch = "?"
        if runs and runs[-1][1] is font:
            runs[-1] = (runs[-1][0] + ch, font)
        else:
            runs.append((ch, font))
    return runs


def _text_size(draw: ImageDraw.ImageDraw, text: str, size: int) -> tuple[int, int]:
    width = 0.0
    for run, font in _runs(text, size):
        width += draw.textlength(run, font=font)
    return math.ceil(width), int(size * 1.25)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int) -> None:
    """Draw ``text`` with its top-left corner at ``xy`` on a black background, in the box colour."""
    width, height = _text_size(draw, text, size)
    x, y = xy
    draw.rectangle((x, y, x + width + 2, y + height), fill=_TEXT_BACKGROUND)
    for run, font in _runs(text, size):
        draw.text((x + 1, y + height / 2), run, fill=_BOX_COLOUR, font=font, anchor="lm")
        x += draw.textlength(run, font=font)


def _window(ds: Dataset) -> tuple[float, float] | None:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None or centre == "" or width == "":
        return None
    c = float(centre[0] if isinstance(centre, list | tuple) or (hasattr(centre, "__getitem__") and not isinstance(
        centre, str | float | int)) else centre)
    w = float(width[0] if isinstance(width, list | tuple) or (hasattr(width, "__getitem__") and not isinstance(
        width, str | float | int)) else width)
    return (c, w) if w > 0 else None


def _to_display(ds: Dataset, frame: np.ndarray, photometric: str) -> np.ndarray:
    """An 8-bit RGB picture of one decoded frame, windowed as the source asks."""
    if photometric == "PALETTE COLOR" and frame.ndim == 2:
        frame = apply_color_lut(frame, ds)
    if frame.ndim == 3:
        if frame.dtype != np.uint8:
            frame = (frame.astype(np.float32) * (255.0 / max(1.0, float(frame.max())))).astype(np.uint8)
        return np.ascontiguousarray(frame)
    values = frame
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        values = apply_modality_lut(frame, ds)
    values = values.astype(np.float32, copy=False)
    window = _window(ds)
    if window is not None:
        centre, width = window
        low, high = centre - width / 2.0, centre + width / 2.0
    else:
        low, high = (float(v) for v in np.percentile(values[::4, ::4], (0.5, 99.5)))
        if high <= low:
            high = low + 1.0
    grey = np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[:, :, None], 3, axis=2)


def _decode(ds: Dataset, frame: int | None) -> np.ndarray:
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    array, _ = decoder.as_array(ds, index=None if frame is None else frame - 1)
    if array.ndim == 4 or (array.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1):
        array = array[0]
    return array


def render_frame(ds: Dataset, frame: int | None, findings: list[PreparedFinding], banner: str) -> np.ndarray:
    """The source frame with boxes, labels and ``banner`` burned in, as (rows, columns, 3) uint8."""
    decoded = _decode(ds, frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    rgb = _to_display(ds, decoded, photometric)
    rows, columns = rgb.shape[:2]
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    size = max(10, min(rows, columns) // 40)
    line = max(1, min(rows, columns) // 500)
    for f in findings:
        assert f.box is not None
        x0, y0 = f.box.x0, f.box.y0
        x1, y1 = max(x0, f.box.x1 - 1), max(y0, f.box.y1 - 1)  # pixel edges to the last covered pixel
        draw.rectangle((x0, y0, x1, y1), outline=_BOX_COLOUR, width=line)
        label = graphic_label(f)
        _, height = _text_size(draw, label, size)
        ty = y0 - height - line
        if ty < 0:
            ty = min(y1 + line, rows - height)
        _draw_text(draw, (x0, ty), label, size)
    _draw_text(draw, (0, 0), banner, size)
    return np.asarray(image)


def _orientation(ds: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the source when it is two single-letter biped values (what highdicom accepts)."""
    value = ds.get("PatientOrientation")
    if value and len(value) == 2 and all(str(v) in _BIPED for v in value):
        return str(value[0]), str(value[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        letters = (("L", "R"), ("P", "A"), ("H", "F"))

        def axis(vector: list[float]) -> str:
            i = int(np.argmax(np.abs(vector)))
            return letters[i][0] if vector[i] > 0 else letters[i][1]

        return axis([float(v) for v in iop[:3]]), axis([float(v) for v in iop[3:]])
    return None


def build_secondary_captures(ctx: BuildContext) -> list[hd.sc.SCImage]:
    """One burned-in SC per source frame with at least one box, in source order."""
    by_frame: dict[tuple[str, int | None], list[PreparedFinding]] = defaultdict(list)
    for f in ctx.findings_with_geometry():
        by_frame[(str(f.source_uid), f.frame)].append(f)
    banner = single_line(f"AI OUTPUT - {ctx.model_name} {ctx.software_versions[0]} - NOT VERIFIED", 120)
    images: list[hd.sc.SCImage] = []
    for source in ctx.sources.datasets:
        uid = str(source.SOPInstanceUID)
        frames = sorted((k[1] for k in by_frame if k[0] == uid), key=lambda v: -1 if v is None else v)
        for frame in frames:
            pixels = render_frame(source, frame, by_frame[(uid, frame)], banner)
            orientation = _orientation(source)
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=ctx.series_uid(ObjectKind.SC),
                series_number=ctx.series_number(ObjectKind.SC),
                sop_instance_uid=ctx.instance_uid(ObjectKind.SC, uid, frame or 1),
                instance_number=len(images) + 1,
                manufacturer=ctx.manufacturer,
                # highdicom requires an orientation in the patient coordinate system; replaced below when the
                # source has none.
                patient_orientation=orientation or ("L", "F"),
                manufacturer_model_name=ctx.model_name,
                software_versions=list(ctx.software_versions),
                device_serial_number=ctx.device_serial_number,
                contributing_equipment=ctx.contributing_equipment(),
                **ctx.common_kwargs(ObjectKind.SC),  # type: ignore[arg-type]
            )
            if orientation is None:
                sc.PatientOrientation = source.get("PatientOrientation") or ""  # type: ignore[assignment]
            sc.BurnedInAnnotation = "YES"
            sc.ImageComments = single_line(
                f"AI output (not verified): boxes and labels burned in by {ctx.model_name}", 10240
            )
            sc.DerivationDescription = single_line(f"AI findings by {ctx.model_name} drawn over the source", 1024)
            sc.SourceImageSequence = hd.ReferencedImageSequence(
                referenced_images=[source], referenced_frame_number=frame if is_multiframe(source) else None
            )
            copy_image_context(sc, source)
            images.append(sc)
    return images
