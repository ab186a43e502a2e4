"""From phantoms to training examples, through the same pixel path as inference.

A phantom is encoded as DICOM, decoded again, turned into a display-ready RGB image (Modality LUT, the header's
window, MONOCHROME1 inversion: :func:`display_pixels`, the inference library's preprocessing when it is
available) and resized to the model's input by :func:`model_pixels`, the function the demo adapter uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from inference.demo.phantoms import ANATOMY, LESIONS, Phantom, read_back
from inference.demo.texts import (
    answer_grounded_report,
    answer_text_to_region,
    chat_prompt,
    prompt_grounded_report,
    prompt_text_to_region,
)
from inference.geometry import ImageTransform

__all__ = ["Example", "display_pixels", "make_example", "model_pixels"]

logger = logging.getLogger(__name__)

#: The model's input side (pixels); kept here so the adapter does not import torch to know it.
INPUT_SIDE = 128


def display_pixels(ds: Dataset) -> np.ndarray:
    """uint8 RGB (rows, columns, 3) of a grey-scale single-frame dataset: Modality LUT, header window (first
    value) or full range, MONOCHROME1 inverted. The phantoms need no more than that."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = max(float(np.atleast_1d(ds.WindowWidth)[0]), 1.0)
        low = center - 0.5 - (width - 1) / 2
        scaled = np.clip((values - low) / max(width - 1, 1.0), 0.0, 1.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    grey = np.round(scaled * 255.0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def model_pixels(rgb: np.ndarray) -> tuple[np.ndarray, ImageTransform]:
    """The image stretched to the model's square input (bilinear) and the transform that records it.

    The demonstration model reads boxes relative to the whole image (0..999), so a stretch keeps every pixel and
    maps relative coordinates one to one.
    """
    rows, columns = rgb.shape[:2]
    resized = Image.fromarray(rgb).resize((INPUT_SIDE, INPUT_SIDE), Image.Resampling.BILINEAR)
    transform = ImageTransform.identity(columns, rows).resize(INPUT_SIDE, INPUT_SIDE)
    return np.asarray(resized, dtype=np.uint8), transform


@dataclass(frozen=True)
class Example:
    """One phantom ready for training or evaluation: model-input grey pixels and the ground truth."""

    grey: np.ndarray           # uint8 (INPUT_SIDE, INPUT_SIDE)
    phantom: Phantom


def make_example(phantom: Phantom) -> Example:
    ds = read_back(phantom)
    pixels, _ = model_pixels(display_pixels(ds))
    return Example(pixels[:, :, 0].copy(), phantom)


def texts_for(example: Example, rng: np.random.Generator) -> tuple[str, str]:
    """A random (prompt, answer) pair for ``example``: profile, language and targets drawn from ``rng``."""
    language = "zh" if rng.random() < 0.5 else "en"
    phantom = example.phantom
    if rng.random() < 0.5:
        return chat_prompt(prompt_grounded_report(language)), answer_grounded_report(phantom, language)
    present = sorted({s.label for s in phantom.lesions})
    # Mostly ask for something that is there; sometimes for a lesion that is not; sometimes for anatomy;
    # sometimes for several targets at once.
    pool: Sequence[str] = present if present and rng.random() < 0.6 else list(LESIONS)
    if rng.random() < 0.3:
        pool = list(ANATOMY)
    count = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
    everything = [*LESIONS, *ANATOMY]
    targets = [str(rng.choice(list(pool)))]
    others = [t for t in everything if t not in targets]
    targets += [str(t) for t in rng.choice(others, size=count - 1, replace=False)]
    names = [(LESIONS | ANATOMY)[t] if language == "zh" else t for t in targets]
    return chat_prompt(prompt_text_to_region(names, language)), answer_text_to_region(phantom, targets, language)
