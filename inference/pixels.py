"""From DICOM pixel data to display-ready uint8 RGB images, and the choice of images within a study.

The pipeline follows the DICOM grey-scale display chain (PS3.3 C.11, PS3.4 N.2):

1. decode the frame (every transfer syntax pydicom decodes with the pylibjpeg/pyjpegls plugins installed:
   uncompressed little/big endian, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000);
2. Modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence (per frame for enhanced objects);
3. VOI: a VOI LUT Sequence or a window (LINEAR, LINEAR_EXACT, SIGMOID) from the header, a CT preset (lung,
   soft tissue, bone, brain, liver; Hounsfield units), or the robust pixel range;
4. MONOCHROME1 is inverted so that air is dark;
5. colour: RGB, YBR_FULL and YBR_FULL_422 (converted to RGB by the decoder), YBR_RCT/ICT (JPEG 2000),
   PALETTE COLOR (through its LUTs); more than 8 bits per sample are scaled by Bits Stored.

:func:`select_images` picks which instances and frames of a study go to the model (N evenly spaced slices per
CT/MR series); :func:`load_image` makes one :class:`~inference.types.ModelImage` that remembers its SOP Instance
UID and frame number.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array

from inference.errors import PoisonInputError
from inference.types import ModelImage
from sr_writer.findings import ImageRef, uid_hash

__all__ = [
    "CT_WINDOWS",
    "ImageCandidate",
    "InstanceHeader",
    "evenly_spaced",
    "load_candidates",
    "load_image",
    "pad",
    "read_header",
    "render_frame",
    "resample",
    "select_images",
]

logger = logging.getLogger(__name__)

#: CT windows as (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}

#: Modalities whose images are projections, each one worth sending (no slice selection).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "IO", "PX", "XA", "RF", "OT", "SC", "XC", "ES", "GM"})
#: Objects that carry pixels but are not images to read (segmentations, dose grids, presentation states).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "SR", "PR", "KO", "REG", "DOC"})


# ---------------------------------------------------------------------------------------------------------------
# Rendering one frame
# ---------------------------------------------------------------------------------------------------------------
def _functional_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for one frame of an enhanced object (per-frame, else shared groups)."""
    for groups_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_name)
        if not groups:
            continue
        group = groups[frame_index] if groups_name.startswith("PerFrame") and frame_index < len(groups) else groups[0]
        items = group.get(sequence)
        if items:
            return items[0]  # type: ignore[no-any-return]
    return None


def _modality_lut(arr: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    transform = _functional_item(ds, frame_index, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        slope = float(transform.RescaleSlope)
        intercept = float(transform.get("RescaleIntercept", 0.0))
        return arr.astype(np.float64) * slope + intercept
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    return arr.astype(np.float64)


def _window_from_header(ds: Dataset, frame_index: int) -> tuple[float, float, str] | None:
    """(centre, width, function) of the first window in the header (frame VOI for enhanced objects)."""
    source: Dataset = _functional_item(ds, frame_index, "FrameVOILUTSequence") or ds
    centre, width = source.get("WindowCenter"), source.get("WindowWidth")
    if centre is None or width is None:
        return None
    if isinstance(centre, pydicom.multival.MultiValue):
        centre = centre[0]
    if isinstance(width, pydicom.multival.MultiValue):
        width = width[0]
    try:
        c, w = float(centre), float(width)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
        return None
    return c, w, str(source.get("VOILUTFunction", "LINEAR")).upper()


def apply_window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A DICOM window (PS3.3 C.11.2.1.2) as float32 in 0..1."""
    x = values.astype(np.float64, copy=False)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    elif function == "LINEAR_EXACT":
        out = (x - centre) / width + 0.5
    else:  # LINEAR; widths below 1 are not allowed by the standard, treat them as 1
        out = (x - (centre - 0.5)) / max(width - 1.0, 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _robust_range(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values[:: max(1, values.size // 262144)] if values.ndim == 1 else values, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.asarray(np.rint(unit * 255.0), dtype=np.uint8)


def render_frame(arr: np.ndarray, ds: Dataset, frame_index: int = 0, window: str = "auto") -> tuple[np.ndarray, str]:
    """One decoded frame as uint8 RGB (rows, columns, 3), and the name of the VOI applied.

    ``arr`` is the decoder's output for that frame (colour already converted to RGB by pydicom).
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
        return _to_uint8(rgb.astype(np.float32) / scale), "palette"
    if samples == 3:
        bits = int(ds.get("BitsStored", 8))
        if arr.dtype == np.uint8 and bits == 8:
            return np.ascontiguousarray(arr), "colour"
        peak = float(2**bits - 1)
        return _to_uint8(np.clip(arr.astype(np.float64) / peak, 0.0, 1.0)), "colour"
    if samples != 1:
        raise PoisonInputError(f"SamplesPerPixel must be 1 or 3, got {samples}")

    modality = str(ds.get("Modality", "")).upper()
    values = _modality_lut(arr, ds, frame_index)
    used = "full_range"
    unit: np.ndarray | None = None
    if window in CT_WINDOWS and modality == "CT":
        unit, used = apply_window(values, *CT_WINDOWS[window]), window
    elif window != "full_range":
        if "VOILUTSequence" in ds and _functional_item(ds, frame_index, "FrameVOILUTSequence") is None:
            lut = ds.VOILUTSequence[0]
            bits = int(lut.LUTDescriptor[2]) if "LUTDescriptor" in lut else 16
            mapped = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float64)
            unit, used = np.clip(mapped / float(2**bits - 1), 0.0, 1.0).astype(np.float32), "header"
        elif (found := _window_from_header(ds, frame_index)) is not None:
            unit, used = apply_window(values, *found), "header"
        elif window == "auto" and modality == "CT":
            unit, used = apply_window(values, *CT_WINDOWS["soft_tissue"]), "soft_tissue"
    if unit is None:
        unit = _robust_range(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    grey = _to_uint8(unit)
    return np.repeat(grey[:, :, None], 3, axis=2), used


# ---------------------------------------------------------------------------------------------------------------
# Headers and selection
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceHeader:
    """What selection needs to know about one DICOM file (read without its pixel data)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    has_pixels: bool
    frames: int
    instance_number: int | None
    position: float | None  # position along the slice normal, when the geometry is there

    @property
    def is_image(self) -> bool:
        return self.has_pixels and self.modality not in NON_IMAGE_MODALITIES


@dataclass(frozen=True)
class ImageCandidate:
    """One image chosen for the model: a file and a 1-based frame number."""

    header: InstanceHeader
    frame_number: int = 1

    @property
    def ref(self) -> ImageRef:
        return ImageRef(self.header.sop_instance_uid, self.frame_number)


def read_header(path: Path | str) -> InstanceHeader | None:
    """The header of one file; ``None`` (logged) when it is not DICOM."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        logger.warning("skipping %s: not a readable DICOM file (%s)", path.name, type(exc).__name__)
        return None
    # stop_before_pixels hides the pixel element itself; its presence is told by the image pixel module.
    has_pixels = "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds
    position: float | None = None
    try:
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        origin = [float(v) for v in ds.ImagePositionPatient]
        normal = np.cross(orientation[:3], orientation[3:])
        position = float(np.dot(normal, origin))
    except (AttributeError, TypeError, ValueError):
        position = None
    number = ds.get("InstanceNumber")
    return InstanceHeader(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        modality=str(ds.get("Modality", "")).upper(),
        has_pixels=has_pixels,
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        instance_number=int(number) if number not in (None, "") else None,
        position=position,
    )


def evenly_spaced(count: int, wanted: int) -> list[int]:
    """``wanted`` indices out of ``count``, the centres of ``wanted`` equal parts (all when ``count <= wanted``)."""
    if count <= wanted:
        return list(range(count))
    return sorted({min(count - 1, int((i + 0.5) * count / wanted)) for i in range(wanted)})


def select_images(
    headers: Iterable[InstanceHeader], slices_per_series: int = 3, max_images: int = 8
) -> list[ImageCandidate]:
    """The images of a study worth sending to the model.

    Projection images (CR, DX, MG, ...) are taken one per instance; series of slices (CT, MR, and any multi-frame
    object such as enhanced MR or an ultrasound cine) give ``slices_per_series`` evenly spaced slices, ordered by
    position along the slice normal, else Instance Number, else frame order. Series are visited in a stable
    order (by Series Instance UID) and the total is capped at ``max_images``, taken round-robin over series.
    """
    if slices_per_series < 1 or max_images < 1:
        raise ValueError(f"slices_per_series and max_images must be >= 1, got {slices_per_series} and {max_images}")
    series: dict[str, list[InstanceHeader]] = defaultdict(list)
    for header in headers:
        if header.is_image and header.sop_instance_uid:
            series[header.series_instance_uid].append(header)
    per_series: list[list[ImageCandidate]] = []
    for uid in sorted(series):
        members = sorted(
            series[uid],
            key=lambda h: (
                h.position if h.position is not None else math.inf,
                h.instance_number if h.instance_number is not None else math.inf,
                h.sop_instance_uid,
            ),
        )
        slices = [ImageCandidate(h, f) for h in members for f in range(1, h.frames + 1)]
        projection = all(h.modality in PROJECTION_MODALITIES and h.frames == 1 for h in members)
        if not projection:
            slices = [slices[i] for i in evenly_spaced(len(slices), slices_per_series)]
        per_series.append(slices)
    chosen: list[ImageCandidate] = []
    depth = 0
    while len(chosen) < max_images and any(depth < len(s) for s in per_series):
        for slices in per_series:
            if depth < len(slices) and len(chosen) < max_images:
                chosen.append(slices[depth])
        depth += 1
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _decode_frame(ds: Dataset, frame_index: int) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame_index >= frames:
        raise PoisonInputError(f"frame number {frame_index + 1} is beyond NumberOfFrames {frames}")
    if frames > 1:
        return pixel_array(ds, index=frame_index)
    return ds.pixel_array  # type: ignore[no-any-return]


def load_image(
    source: Path | str | Dataset, frame_number: int = 1, window: str = "auto", series_uid: str | None = None
) -> ModelImage:
    """One frame of a DICOM image as a :class:`ModelImage`; :class:`PoisonInputError` when it cannot be decoded."""
    ds = source if isinstance(source, Dataset) else pydicom.dcmread(source)
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if not sop_uid:
        raise PoisonInputError("image has no SOPInstanceUID")
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise PoisonInputError(f"image {uid_hash(sop_uid)} has no integer PixelData ({kinds or 'none'})")
    try:
        arr = _decode_frame(ds, frame_number - 1)
        rgb, used = render_frame(arr, ds, frame_number - 1, window)
    except PoisonInputError:
        raise
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError on corrupt data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PoisonInputError(
            f"pixels of image {uid_hash(sop_uid)} frame {frame_number} (transfer syntax {ts}) cannot be "
            f"decoded: {type(exc).__name__}: {exc}"
        ) from exc
    if rgb.ndim != 3 or rgb.shape[:2] != (int(ds.Rows), int(ds.Columns)):
        raise PoisonInputError(
            f"decoded image {uid_hash(sop_uid)} has shape {rgb.shape}, expected ({ds.Rows}, {ds.Columns}, 3)"
        )
    return ModelImage(
        pixels=rgb,
        ref=ImageRef(sop_uid, frame_number),
        modality=str(ds.get("Modality", "")).upper(),
        series_instance_uid=series_uid or str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        window=used,
        body_part=str(ds.get("BodyPartExamined", "")),
    )


def load_candidates(candidates: Sequence[ImageCandidate], window: str = "auto") -> tuple[list[ModelImage], list[str]]:
    """Decode the chosen images; returns (images, problems). Undecodable images are skipped and reported."""
    images: list[ModelImage] = []
    problems: list[str] = []
    cache: dict[Path, Dataset] = {}
    for candidate in candidates:
        path = candidate.header.path
        try:
            ds = cache.get(path) or pydicom.dcmread(path)
            cache[path] = ds
            images.append(load_image(ds, candidate.frame_number, window))
        except (PoisonInputError, InvalidDicomError, OSError) as exc:
            reason = f"image {uid_hash(candidate.header.sop_instance_uid)} frame {candidate.frame_number}: {exc}"
            logger.warning("skipping unusable image: %s", reason)
            problems.append(reason)
    return images, problems


# ---------------------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------------------
def resample(pixels: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """``pixels`` (uint8 RGB) resampled to ``columns`` x ``rows`` (bicubic; area-like when shrinking)."""
    if pixels.shape[1] == columns and pixels.shape[0] == rows:
        return pixels
    from PIL import Image

    image = Image.fromarray(pixels)
    shrinking = columns < pixels.shape[1] and rows < pixels.shape[0]
    method = Image.Resampling.BOX if shrinking and pixels.shape[1] >= 2 * columns else Image.Resampling.BICUBIC
    return np.asarray(image.resize((columns, rows), method))


def pad(pixels: np.ndarray, left: int, top: int, right: int, bottom: int, value: int = 0) -> np.ndarray:
    """``pixels`` padded with ``value`` (black by default)."""
    return np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=value)
