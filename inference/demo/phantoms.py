"""Synthetic phantoms for the demonstration model: radiograph-like and CT-slice-like images with lesions.

Each :class:`Phantom` carries a real DICOM dataset (CR chest-like or CT axial-like, written with pydicom) and its
ground truth: the lesions (``nodule``, ``opacity``) and the anatomy (``right lung``, ``left lung``, ``heart``) as
boxes in source pixel space (column, row; pixel edges). Everything is drawn from a :class:`numpy.random.Generator`,
so one seed gives one data set.

No patient data: the datasets carry a fixed synthetic patient ("PHANTOM^DEMO") and UIDs derived from the seed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
)

from sr_writer.findings import BoundingBox, result_uid

__all__ = [
    "ANATOMY",
    "LESIONS",
    "Phantom",
    "Structure",
    "generate_phantom",
    "iter_phantoms",
    "read_back",
]

#: Lesion kinds the phantoms contain (English label -> Chinese label).
LESIONS: dict[str, str] = {"nodule": "结节", "opacity": "阴影"}
#: Anatomy the phantoms contain, with boxes (English -> Chinese).
ANATOMY: dict[str, str] = {"right lung": "右肺", "left lung": "左肺", "heart": "心脏"}


@dataclass(frozen=True)
class Structure:
    """One ground-truth object: label (English), box in source pixel space, and where it lies."""

    label: str
    box: BoundingBox
    side: str = ""  # "right" | "left" (patient side; image left is patient right)
    zone: str = ""  # "upper" | "middle" | "lower" (radiographs only)
    size: str = ""  # "small" | "large" (lesions only)


@dataclass(frozen=True)
class Phantom:
    """A synthetic image as DICOM plus its ground truth."""

    dataset: Dataset
    kind: str  # "radiograph" | "ct"
    lesions: tuple[Structure, ...]
    anatomy: tuple[Structure, ...]

    @property
    def rows(self) -> int:
        return int(self.dataset.Rows)

    @property
    def columns(self) -> int:
        return int(self.dataset.Columns)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def save(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def read_back(phantom: Phantom) -> Dataset:
    """The phantom encoded and decoded again, as the node would receive it."""
    return dcmread(io.BytesIO(phantom.to_bytes()))


# --- drawing --


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, edge: float) -> np.ndarray:
    """A soft ellipse (1 inside, 0 outside), value 0.5 on the ellipse itself; ``edge`` is the ramp width (px).

    Coordinates are pixel edges: pixel (i, j) has its centre at (j + 0.5, i + 0.5).
    """
    rows, cols = shape
    y = (np.arange(rows, dtype=np.float32) + 0.5 - cy)[:, None] / ry
    x = (np.arange(cols, dtype=np.float32) + 0.5 - cx)[None, :] / rx
    d = np.sqrt(x * x + y * y)
    return np.clip((1.0 - d) * min(rx, ry) / max(edge, 0.3) + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], grid: int) -> np.ndarray:
    small = rng.standard_normal((grid, grid)).astype(np.float32)
    image = Image.fromarray(small, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def _box(cy: float, cx: float, ry: float, rx: float, rows: int, cols: int) -> BoundingBox:
    box = BoundingBox(cx - rx, cy - ry, cx + rx, cy + ry).clipped(cols, rows)
    assert box is not None
    return box


@dataclass(frozen=True)
class _Lung:
    cy: float
    cx: float
    ry: float
    rx: float
    side: str


def _place_lesions(
    rng: np.random.Generator, lungs: list[_Lung], count: int, rows: int, cols: int, kind: str
) -> list[tuple[str, float, float, float, float, float, float]]:
    """(label, cy, cx, ry, rx, edge, contrast) for ``count`` non-overlapping lesions inside the lungs."""
    placed: list[tuple[str, float, float, float, float, float, float]] = []
    short = min(rows, cols)
    tries = 0
    while len(placed) < count and tries < 200:
        tries += 1
        label = "nodule" if rng.random() < 0.55 else "opacity"
        lung = lungs[int(rng.integers(len(lungs)))]
        if label == "nodule":
            r = float(rng.uniform(0.03, 0.065)) * short
            ry, rx = r * float(rng.uniform(0.85, 1.15)), r * float(rng.uniform(0.85, 1.15))
            edge = float(rng.uniform(0.6, 1.8)) * short / 256
            contrast = float(rng.uniform(0.35, 0.8))
        else:
            r = float(rng.uniform(0.06, 0.12)) * short
            ry, rx = r * float(rng.uniform(0.7, 1.3)), r * float(rng.uniform(0.7, 1.3))
            edge = float(rng.uniform(0.15, 0.3)) * min(ry, rx)
            contrast = float(rng.uniform(0.25, 0.5))
        angle = rng.uniform(0, 2 * math.pi)
        dist = math.sqrt(float(rng.uniform(0, 1))) * 0.72
        cy = lung.cy + dist * lung.ry * math.sin(angle)
        cx = lung.cx + dist * lung.rx * math.cos(angle)
        if cy - ry < 1 or cx - rx < 1 or cy + ry > rows - 1 or cx + rx > cols - 1:
            continue
        margin = 0.15 * short / 10
        clash = any(
            abs(cy - p[1]) < ry + p[3] + margin and abs(cx - p[2]) < rx + p[4] + margin for p in placed
        )
        if clash:
            continue
        placed.append((label, cy, cx, ry, rx, edge, contrast))
    return placed


def _zone(cy: float, lung: _Lung) -> str:
    top = lung.cy - lung.ry
    third = (cy - top) / (2 * lung.ry)
    return "upper" if third < 1 / 3 else ("middle" if third < 2 / 3 else "lower")


def _nearest_lung(cx: float, lungs: list[_Lung]) -> _Lung:
    return min(lungs, key=lambda lung: abs(lung.cx - cx))


def _draw_radiograph(
    rng: np.random.Generator, rows: int, cols: int, n_lesions: int
) -> tuple[np.ndarray, list[Structure], list[Structure]]:
    shape = (rows, cols)
    img = np.full(shape, 0.04, dtype=np.float32)
    torso = _ellipse(
        shape,
        rows * rng.uniform(0.55, 0.62),
        cols * 0.5,
        rows * rng.uniform(0.55, 0.65),
        cols * rng.uniform(0.42, 0.48),
        6.0,
    )
    img += torso * 0.42
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731
    lungs = []
    for side, sign in (("right", -1), ("left", 1)):
        lungs.append(
            _Lung(
                cy=rows * (0.46 + jitter(0.04)),
                cx=cols * (0.5 + sign * (0.2 + jitter(0.025))),
                ry=rows * (0.29 + jitter(0.035)),
                rx=cols * (0.135 + jitter(0.02)),
                side=side,
            )
        )
    for lung in lungs:
        img -= _ellipse(shape, lung.cy, lung.cx, lung.ry, lung.rx, 4.0) * 0.3
    # ribs: faint arcs across the lungs
    yy = np.arange(rows, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(cols, dtype=np.float32)[None, :] + 0.5
    for k in range(6):
        y0 = rows * (0.2 + 0.09 * k + jitter(0.01))
        curve = y0 + (rows * 0.25) * ((xx - cols / 2) / cols) ** 2 * 4
        img += (np.abs(yy - curve) < rows * 0.012).astype(np.float32) * 0.05 * torso
    heart = (
        rows * (0.62 + jitter(0.03)),
        cols * (0.54 + jitter(0.03)),
        rows * (0.13 + jitter(0.02)),
        cols * (0.13 + jitter(0.02)),
    )
    heart_mask = _ellipse(shape, *heart, 5.0)
    img = img * (1 - heart_mask) + heart_mask * 0.5
    spine = (np.abs(xx - cols / 2) < cols * 0.035).astype(np.float32) * torso * 0.08
    img += spine
    lesions = _place_lesions(rng, lungs, n_lesions, rows, cols, "radiograph")
    structures: list[Structure] = []
    for label, cy, cx, ry, rx, edge, contrast in lesions:
        img += _ellipse(shape, cy, cx, ry, rx, edge) * contrast * 0.5
        lung = _nearest_lung(cx, lungs)
        size = "small" if max(ry, rx) < 0.05 * min(rows, cols) else "large"
        structures.append(
            Structure(label, _box(cy, cx, ry, rx, rows, cols), lung.side, _zone(cy, lung), size)
        )
    img += _smooth_noise(rng, shape, 6) * 0.025
    img += rng.standard_normal(shape).astype(np.float32) * float(rng.uniform(0.005, 0.02))
    anatomy = [
        Structure(f"{lung.side} lung", _box(lung.cy, lung.cx, lung.ry, lung.rx, rows, cols), lung.side)
        for lung in lungs
    ]
    anatomy.append(Structure("heart", _box(*heart, rows, cols)))
    return np.clip(img, 0.0, 1.0), structures, anatomy


def _draw_ct(
    rng: np.random.Generator, rows: int, cols: int, n_lesions: int
) -> tuple[np.ndarray, list[Structure], list[Structure]]:
    """Hounsfield units of an axial chest slice."""
    shape = (rows, cols)
    jitter = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = (
        rows * (0.5 + jitter(0.02)),
        cols * 0.5,
        rows * (0.33 + jitter(0.03)),
        cols * (0.44 + jitter(0.03)),
    )
    hu += _ellipse(shape, *body, 1.5) * 1040.0  # soft tissue, 40 HU
    hu -= _ellipse(shape, body[0], body[1], body[2] * 0.93, body[3] * 0.95, 1.5) * 60.0  # fat layer inside
    lungs = []
    for side, sign in (("right", -1), ("left", 1)):
        lungs.append(
            _Lung(
                cy=rows * (0.47 + jitter(0.02)),
                cx=cols * (0.5 + sign * (0.19 + jitter(0.02))),
                ry=body[2] * (0.75 + jitter(0.06)),
                rx=cols * (0.14 + jitter(0.015)),
                side=side,
            )
        )
    for lung in lungs:
        hu -= _ellipse(shape, lung.cy, lung.cx, lung.ry, lung.rx, 1.2) * 850.0
    heart = (
        rows * (0.47 + jitter(0.02)),
        cols * (0.53 + jitter(0.02)),
        rows * (0.1 + jitter(0.015)),
        cols * (0.09 + jitter(0.015)),
    )
    heart_mask = _ellipse(shape, *heart, 1.5)
    hu = hu * (1 - heart_mask) + heart_mask * 45.0
    vert_cy = body[0] + body[2] * 0.72
    hu += _ellipse(shape, vert_cy, cols * 0.5, rows * 0.05, cols * 0.045, 1.0) * 650.0
    hu -= _ellipse(shape, vert_cy, cols * 0.5, rows * 0.03, cols * 0.028, 1.0) * 450.0
    lesions = _place_lesions(rng, lungs, n_lesions, rows, cols, "ct")
    structures: list[Structure] = []
    for label, cy, cx, ry, rx, edge, contrast in lesions:
        mask = _ellipse(shape, cy, cx, ry, rx, edge)
        target = 30.0 if label == "nodule" else -500.0 + 300.0 * (contrast - 0.25)
        hu = hu * (1 - mask) + mask * target
        lung = _nearest_lung(cx, lungs)
        size = "small" if max(ry, rx) < 0.05 * min(rows, cols) else "large"
        structures.append(Structure(label, _box(cy, cx, ry, rx, rows, cols), lung.side, "", size))
    hu += _smooth_noise(rng, shape, 8) * 15.0
    hu += rng.standard_normal(shape).astype(np.float32) * float(rng.uniform(8.0, 25.0))
    anatomy = [
        Structure(f"{lung.side} lung", _box(lung.cy, lung.cx, lung.ry, lung.rx, rows, cols), lung.side)
        for lung in lungs
    ]
    anatomy.append(Structure("heart", _box(*heart, rows, cols)))
    return np.clip(hu, -1024.0, 3071.0), structures, anatomy


# --- DICOM ---------------------------------------------------------------------------------------------------


def _base_dataset(rng: np.random.Generator, sop_class: str, modality: str) -> Dataset:
    seed_uid = int(rng.integers(0, 2**62))
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = result_uid("demo-phantom", seed_uid, "sop")
    ds.StudyInstanceUID = result_uid("demo-phantom", seed_uid, "study")
    ds.SeriesInstanceUID = result_uid("demo-phantom", seed_uid, "series")
    file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName = "PHANTOM^DEMO"
    ds.PatientID = "PHANTOM"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "DICOM AI node demo phantom"
    ds.StudyDescription = "Synthetic phantom (demonstration, not clinical)"
    ds.SamplesPerPixel = 1
    return ds


def _radiograph_dataset(rng: np.random.Generator, img: np.ndarray) -> Dataset:
    ds = _base_dataset(rng, ComputedRadiographyImageStorage, "CR")
    stored = np.round(img * 4095.0).astype(np.uint16)
    ds.PhotometricInterpretation = "MONOCHROME2"
    if rng.random() < 0.3:
        stored = (4095 - stored).astype(np.uint16)
        ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if rng.random() < 0.5:
        ds.WindowCenter = int(2048 + rng.integers(-200, 200))
        ds.WindowWidth = int(4096 - rng.integers(0, 600))
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    return ds


def _ct_dataset(rng: np.random.Generator, hu: np.ndarray) -> Dataset:
    ds = _base_dataset(rng, CTImageStorage, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    if rng.random() < 0.5:
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        stored = np.round(hu).astype(np.int16)
    else:
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        stored = np.round(hu + 1024).astype(np.uint16)
    ds.RescaleType = "HU"
    ds.WindowCenter = int(-600 + rng.integers(-60, 60))
    ds.WindowWidth = int(1500 + rng.integers(-150, 150))
    ds.KVP = 120
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = result_uid("demo-phantom", str(ds.SOPInstanceUID), "frame-of-reference")
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    return ds


def generate_phantom(
    rng: np.random.Generator, kind: str | None = None, n_lesions: int | None = None
) -> Phantom:
    """One phantom. ``kind``: "radiograph" | "ct" (random when None); ``n_lesions``: 0..3 (random when None)."""
    if kind is None:
        kind = "radiograph" if rng.random() < 0.6 else "ct"
    if n_lesions is None:
        n_lesions = int(rng.choice(4, p=[0.1, 0.55, 0.25, 0.1]))
    if kind not in ("radiograph", "ct"):
        raise ValueError(f"generate_phantom: kind must be 'radiograph' or 'ct', got {kind!r}")
    if not 0 <= n_lesions <= 3:
        raise ValueError(f"generate_phantom: n_lesions must be within 0..3, got {n_lesions}")
    if kind == "radiograph":
        rows = int(rng.integers(224, 448))
        cols = int(np.clip(rows * rng.uniform(0.8, 1.2), 200, 480))
        img, lesions, anatomy = _draw_radiograph(rng, rows, cols, n_lesions)
        ds = _radiograph_dataset(rng, img)
    else:
        side = int(rng.choice([256, 320, 384]))
        hu, lesions, anatomy = _draw_ct(rng, side, side, n_lesions)
        ds = _ct_dataset(rng, hu)
    ordered = sorted(lesions, key=lambda s: (s.box.y0, s.box.x0))
    return Phantom(ds, kind, tuple(ordered), tuple(anatomy))


def iter_phantoms(seed: int, count: int, n_lesions: int | None = None) -> Iterator[Phantom]:
    """``count`` phantoms from ``seed`` (the same seed always gives the same phantoms)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield generate_phantom(rng, n_lesions=n_lesions)
