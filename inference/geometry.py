"""Geometry you can trust: every resize, pad and crop between a DICOM image and a model's input, recorded.

A :class:`ImageTransform` maps pixel-edge coordinates (column, row) of the source image to the model's
input image and back. Each step is an axis-aligned affine map per axis, so the composition is one scale and
one offset per axis and both directions are exact up to floating point. Boxes parsed from a model's answer
go through :meth:`ImageTransform.box_to_source`; everything after the adapters lives in source pixel space
(DESIGN invariant 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sr_writer.findings import BoundingBox

__all__ = ["ImageTransform", "TransformStep"]


@dataclass(frozen=True)
class TransformStep:
    """One recorded operation: ``kind`` is ``resize``, ``pad`` or ``crop``; sizes are (columns, rows)."""

    kind: str
    size_before: tuple[int, int]
    size_after: tuple[int, int]
    # resize: scale factors; pad: (left, top) added; crop: (left, top) removed.
    params: tuple[float, float]


@dataclass(frozen=True)
class ImageTransform:
    """Maps source pixel edges to model-input pixel edges: ``x' = sx * x + tx``, ``y' = sy * y + ty``.

    ``source_size`` and ``output_size`` are (columns, rows). Build one with :meth:`identity` and chain
    :meth:`resize`, :meth:`pad` and :meth:`crop`; each returns a new transform.
    """

    source_size: tuple[int, int]
    output_size: tuple[int, int]
    sx: float = 1.0
    sy: float = 1.0
    tx: float = 0.0
    ty: float = 0.0
    steps: tuple[TransformStep, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("source_size", "output_size"):
            cols, rows = getattr(self, name)
            if cols < 1 or rows < 1:
                raise ValueError(f"ImageTransform.{name} must be positive (columns, rows), got {(cols, rows)}")

    @classmethod
    def identity(cls, columns: int, rows: int) -> ImageTransform:
        return cls(source_size=(columns, rows), output_size=(columns, rows))

    def resize(self, columns: int, rows: int) -> ImageTransform:
        """Then the whole current image is resampled to ``columns`` x ``rows`` (edges map to edges)."""
        if columns < 1 or rows < 1:
            raise ValueError(f"resize needs a positive size (columns, rows), got {(columns, rows)}")
        cw, ch = self.output_size
        fx, fy = columns / cw, rows / ch
        step = TransformStep("resize", self.output_size, (columns, rows), (fx, fy))
        return ImageTransform(
            self.source_size,
            (columns, rows),
            self.sx * fx,
            self.sy * fy,
            self.tx * fx,
            self.ty * fy,
            (*self.steps, step),
        )

    def pad(self, left: int, top: int, right: int, bottom: int) -> ImageTransform:
        """Then the current image is padded by the given number of pixels on each side."""
        if min(left, top, right, bottom) < 0:
            raise ValueError(f"pad amounts must be >= 0, got {(left, top, right, bottom)}")
        cw, ch = self.output_size
        size = (cw + left + right, ch + top + bottom)
        step = TransformStep("pad", self.output_size, size, (float(left), float(top)))
        return ImageTransform(
            self.source_size, size, self.sx, self.sy, self.tx + left, self.ty + top, (*self.steps, step)
        )

    def pad_to_square(self) -> ImageTransform:
        """Then the image is centred on a square canvas whose side is its longer side."""
        cw, ch = self.output_size
        side = max(cw, ch)
        left, top = (side - cw) // 2, (side - ch) // 2
        return self.pad(left, top, side - cw - left, side - ch - top)

    def crop(self, left: int, top: int, columns: int, rows: int) -> ImageTransform:
        """Then the window (left, top, columns, rows) of the current image is kept."""
        cw, ch = self.output_size
        if left < 0 or top < 0 or columns < 1 or rows < 1 or left + columns > cw or top + rows > ch:
            raise ValueError(f"crop window {(left, top, columns, rows)} must lie inside the image {(cw, ch)}")
        step = TransformStep("crop", self.output_size, (columns, rows), (float(left), float(top)))
        return ImageTransform(
            self.source_size,
            (columns, rows),
            self.sx,
            self.sy,
            self.tx - left,
            self.ty - top,
            (*self.steps, step),
        )

    # -- points --
    def point_to_model(self, x: float, y: float) -> tuple[float, float]:
        return self.sx * x + self.tx, self.sy * y + self.ty

    def point_to_source(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.tx) / self.sx, (y - self.ty) / self.sy

    # -- boxes --
    def box_to_model(self, box: BoundingBox) -> BoundingBox:
        """A source-space box in model-input pixel edges (not clipped)."""
        x0, y0 = self.point_to_model(box.x0, box.y0)
        x1, y1 = self.point_to_model(box.x1, box.y1)
        return BoundingBox(x0, y0, x1, y1)

    def box_to_source(self, box: BoundingBox, clip: bool = True) -> BoundingBox | None:
        """A model-input box in source pixel edges; with ``clip`` it is clipped to the source image (padding
        removed) and ``None`` when nothing of it lies on the source image."""
        x0, y0 = self.point_to_source(box.x0, box.y0)
        x1, y1 = self.point_to_source(box.x1, box.y1)
        out = BoundingBox(x0, y0, x1, y1)
        return out.clipped(*self.source_size) if clip else out
