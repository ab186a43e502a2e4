"""Boxes go forward to each family's model space and back to source pixels with under one pixel of error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.adapters.base import ModelAdapter
from inference.adapters.internvl import InternVLAdapter
from inference.adapters.medgemma import MedGemmaAdapter
from inference.adapters.medrega import MedRegAAdapter
from inference.adapters.qwen import Qwen3VLAdapter, Qwen25VLAdapter
from inference.config import ModelSettings
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace
from inference.types import ModelImage
from sr_writer.findings import BoundingBox, ImageRef
from tests.corpus import COMPRESSED, CORPUS, corpus_file

ADAPTERS: list[type[ModelAdapter]] = [MedRegAAdapter, InternVLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, MedGemmaAdapter]


def corpus_shapes() -> list[tuple[int, int]]:
    """(columns, rows) of every corpus image, plus extremes (tiny, very wide, very tall)."""
    shapes = set()
    for name in [*CORPUS, *COMPRESSED]:
        ds = pydicom.dcmread(corpus_file(name), stop_before_pixels=True)
        shapes.add((int(ds.Columns), int(ds.Rows)))
    return sorted(shapes)


CORPUS_SHAPES = corpus_shapes()
SHAPES = [*CORPUS_SHAPES, (3, 3), (2048, 300), (256, 1024)]


def random_boxes(columns: int, rows: int, count: int = 40, seed: int = 0) -> list[BoundingBox]:
    rng = np.random.default_rng(seed)
    boxes = [BoundingBox(0, 0, columns, rows)]
    while len(boxes) < count:
        x0, x1 = sorted(rng.uniform(0, columns, 2))
        y0, y1 = sorted(rng.uniform(0, rows, 2))
        if x1 - x0 > 0.5 and y1 - y0 > 0.5:
            boxes.append(BoundingBox(x0, y0, x1, y1))
    return boxes


def max_error(a: BoundingBox, b: BoundingBox) -> float:
    return float(np.max(np.abs(np.array(a.as_list()) - np.array(b.as_list()))))


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.family)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_boxes_map_both_ways_on_every_corpus_shape(
    cls: type[ModelAdapter], shape: tuple[int, int], tmp_path: Path
) -> None:
    columns, rows = shape
    adapter = cls(ModelSettings(family=cls.family, path=tmp_path, trust_remote_code=True))
    image = ModelImage(np.zeros((rows, columns, 3), np.uint8), ImageRef("1.2.3"))
    pixels, transform = adapter.prepare_image(image)
    assert pixels.shape[:2] == (transform.output_size[1], transform.output_size[0])
    space: BoxSpace = cls.box_space
    for box in random_boxes(columns, rows):
        # exact: float through the transform and back
        back = transform.box_to_source(transform.box_to_model(box), clip=False)
        assert back is not None and max_error(back, box) < 1e-6
        # as the model writes it: integers in the family's own numbers
        numbers = space.from_source(box, transform)
        if numbers[2] <= numbers[0] or numbers[3] <= numbers[1]:
            continue  # smaller than one model unit: the model cannot express it
        model_box = space.to_model(numbers, transform.output_size)
        assert isinstance(model_box, BoundingBox)
        source = transform.box_to_source(model_box)
        assert source is not None
        # rounding to the model's integers costs at most half a unit of its grid, in source pixels ...
        model_x, model_y = (
            (transform.output_size[0] / space.scale, transform.output_size[1] / space.scale) if space.scale else (1, 1)
        )
        unit_x, unit_y = model_x / transform.sx, model_y / transform.sy
        error = np.abs(np.array(source.as_list()) - np.array(box.as_list()))
        assert (error <= 0.5 * np.array([unit_x, unit_y, unit_x, unit_y]) + 1e-6).all()
        # ... which is under one source pixel on every image of the corpus
        if shape in CORPUS_SHAPES:
            assert error.max() < 1.0, f"{cls.family} {shape}: {box} -> {numbers} -> {source}"


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.family)
def test_transform_matches_the_pixels_the_model_sees(cls: type[ModelAdapter], tmp_path: Path) -> None:
    """A bright square put in the source shows up where the transform says, in the prepared pixels."""
    columns, rows = 1841, 1000
    adapter = cls(ModelSettings(family=cls.family, path=tmp_path, trust_remote_code=True))
    source = np.zeros((rows, columns, 3), np.uint8)
    source[600:700, 1300:1400] = 255
    pixels, transform = adapter.prepare_image(ModelImage(source, ImageRef("1.2.3")))
    expected = transform.box_to_model(BoundingBox(1300, 600, 1400, 700))
    mask = pixels[..., 0] > 127
    found_rows, found_cols = np.nonzero(mask)
    assert abs(found_cols.min() - expected.x0) <= 1.5 and abs(found_cols.max() + 1 - expected.x1) <= 1.5
    assert abs(found_rows.min() - expected.y0) <= 1.5 and abs(found_rows.max() + 1 - expected.y1) <= 1.5


def test_transform_steps_compose() -> None:
    transform = ImageTransform.identity(800, 400).pad_to_square().resize(896, 896).crop(10, 20, 800, 800)
    assert [step.kind for step in transform.steps] == ["pad", "resize", "crop"]
    assert transform.output_size == (800, 800)
    x, y = transform.point_to_model(0, 0)
    assert (x, y) == pytest.approx((-10.0, 200 * 896 / 800 - 20))
    assert transform.point_to_source(x, y) == pytest.approx((0.0, 0.0))
    assert transform.box_to_source(BoundingBox(0, 0, 5, 5)) is None  # inside the padding only
    with pytest.raises(ValueError, match="crop window"):
        transform.crop(0, 0, 900, 10)
