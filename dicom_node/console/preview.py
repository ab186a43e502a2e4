"""A PNG preview of a received image with the model's boxes drawn, made on the server from the spooled file.

Boxes are in source pixel space (DESIGN invariant 7: column, row, pixel edges), so they are scaled with the image.
The image is windowed as a viewer would at first sight: the file's VOI LUT or window when it has one, else its
range; MONOCHROME1 is inverted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from sr_writer.findings import Finding

__all__ = ["PreviewError", "render_preview"]

_MAX_SIDE = 768
_COLOURS = ["#ffcc00", "#00e5ff", "#ff4d88", "#7cff4d", "#ff8c1a", "#b18cff"]


class PreviewError(ValueError):
    """The file cannot be shown (no pixel data, or pixels that cannot be decoded); the message says why."""


def _to_8bit(ds: pydicom.Dataset, frame: int) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom's decoders raise many kinds
        raise PreviewError(f"pixels cannot be decoded: {exc}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[min(max(frame, 1), frames) - 1]
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour: shown as it is
        return np.asarray(pixels, dtype=np.uint8) if pixels.dtype == np.uint8 else _stretch(pixels)
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds)
    out = _stretch(values)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _stretch(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    lo, hi = np.percentile(values, (0.5, 99.5)) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def render_preview(path: Path, numbered: Sequence[tuple[int, Finding]], frame: int = 1) -> bytes:
    """The PNG bytes of ``path`` (frame ``frame``) with the boxes of ``numbered`` findings drawn, each labelled with
    its number in the job's findings table."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise PreviewError(f"not a readable DICOM file: {exc}") from None
    if "PixelData" not in ds:
        raise PreviewError("the instance has no pixel data")
    image = Image.fromarray(_to_8bit(ds, frame)).convert("RGB")
    scale = min(1.0, _MAX_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 200))
    for number, finding in numbered:
        if finding.box is None:
            continue
        b = finding.box
        colour = _COLOURS[(number - 1) % len(_COLOURS)]
        xy = (b.x0 * scale, b.y0 * scale, b.x1 * scale, b.y1 * scale)
        draw.rectangle(xy, outline=colour, width=width)
        draw.text((xy[0] + width + 1, xy[1] + width + 1), str(number), fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
