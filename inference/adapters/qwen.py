"""Qwen2.5-VL (and Lingshu, built on it) and Qwen3-VL: JSON ``bbox_2d`` answers.

* Qwen2.5-VL: coordinates in absolute pixels of the *resized* input (sides multiples of 28 = patch 14 x merge 2,
  pixel count within the processor's min/max). The adapter does that resize itself, so the processor's own
  resize is the identity and a box maps back through the recorded transform exactly.
* Qwen3-VL: coordinates relative on 0..1000; sides multiples of 32 (patch 16 x merge 2).

The chat template writes ``<|vision_start|><|image_pad|><|vision_end|>``; ``<|image_pad|>`` expands to
``prod(image_grid_thw) / merge_size**2`` tokens as Qwen's processor does. The model inputs also carry the
processor's ``mm_token_type_ids`` (1 on image tokens): transformers 5 gives the image tokens their 3-D M-RoPE
positions (and the text after them the shifted ones) only when it is present, and silently 1-D ones otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from inference.adapters.base import HFHandle, ModelAdapter
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace, build_answer, parse_json_boxes
from inference.pixels import resample
from inference.profiles import DEFAULT_TARGETS, modality_noun
from inference.types import (
    IMAGE_PLACEHOLDER,
    GraphInputs,
    ModelImage,
    ParsedAnswer,
    PreparedInput,
    Profile,
    Prompt,
    TaskRequest,
)
from sr_writer.findings import Language

__all__ = [
    "Qwen3VLAdapter",
    "Qwen25VLAdapter",
    "json_box_prompt",
    "mrope_positions",
    "smart_resize",
    "vision_patch_positions",
    "vision_windows",
]

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"


def smart_resize(rows: int, columns: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(rows, columns) rounded to multiples of ``factor`` with a pixel count within [min_pixels, max_pixels]."""
    if min(rows, columns) < 1:
        raise ValueError(f"image size must be positive, got {(rows, columns)}")
    h = max(factor, round(rows / factor) * factor)
    w = max(factor, round(columns / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(rows * columns / max_pixels)
        h = max(factor, math.floor(rows / beta / factor) * factor)
        w = max(factor, math.floor(columns / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (rows * columns))
        h = math.ceil(rows * beta / factor) * factor
        w = math.ceil(columns * beta / factor) * factor
    return h, w


def json_box_prompt(request: TaskRequest, region_numbers: tuple[float, ...] | None, key: str, scale: str) -> str:
    """A grounding prompt for models that answer with a JSON list of ``{key: [...], "label": ...}``."""
    zh = request.language is Language.CHINESE
    noun = modality_noun(request.modality, request.language)
    targets = list(request.targets) or list(DEFAULT_TARGETS[request.language])
    names = ("、" if zh else ", ").join(targets)
    shape = f'{{"{key}": [x1, y1, x2, y2], "label": "..."}}'
    if request.profile is Profile.GROUNDED_REPORT:
        if zh:
            return (
                f"{IMAGE_PLACEHOLDER}\n请为这张{noun}撰写诊断报告（影像诊断和影像结论），并定位{names}及所见病变，"
                f'以JSON列表输出其边界框（{scale}）：[{shape[:-1]}, "description": "..."}}]。'
            )
        return (
            f"{IMAGE_PLACEHOLDER}\nWrite a radiology report (findings and impression) for this {noun}. Locate the "
            f"{names} and any lesion, and output their bounding boxes ({scale}) in JSON format as a list of "
            f'{shape[:-1]}, "description": "..."}}.'
        )
    if request.profile is Profile.TEXT_TO_REGION:
        if zh:
            return f"{IMAGE_PLACEHOLDER}\n请定位这张{noun}中的{names}，以JSON格式输出边界框坐标（{scale}）：[{shape}]。"
        return (
            f"{IMAGE_PLACEHOLDER}\nLocate the {names} in this {noun} and output the bbox coordinates ({scale}) "
            f"in JSON format as a list of {shape}."
        )
    if request.profile is Profile.REGION_TO_TEXT:
        box = json.dumps([round(v) for v in (region_numbers or (0, 0, 1, 1))])
        if zh:
            return f"{IMAGE_PLACEHOLDER}\n这张{noun}中边界框{box}（{scale}）内是什么结构？请用词或短语回答。"
        return (
            f"{IMAGE_PLACEHOLDER}\nWhat is the structure inside the bounding box {box} ({scale}) of this {noun}? "
            "Answer using a single word or phrase."
        )
    return f"{IMAGE_PLACEHOLDER}\n{request.question.strip()}"


# -- host-side preparation of the graph backends' inputs (numpy, the same numbers as transformers' torch code) --
def mrope_positions(ids: np.ndarray, mask: np.ndarray, image_token_id: int, grids: Sequence[Sequence[int]],
                    merge: int) -> np.ndarray:
    """``(3, batch, seq)`` M-RoPE positions of image-and-text prompts, as transformers' ``get_rope_index``.

    Text tokens count on in all three rows; an image's tokens take (start, start + row, start + column) of its
    merged grid and the text after it continues at start + max(rows, columns). Left padding stays at 0.
    ``grids``: (t, h, w) patch grids of the batch's images in order.
    """
    positions = np.zeros((3, *ids.shape), dtype=np.int64)
    images = iter(grids)
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        is_image = ids[row][keep] == image_token_id
        pieces: list[np.ndarray] = []
        current = 0
        start = 0
        while start < is_image.size:
            end = start
            while end < is_image.size and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
            else:
                t, h, w = (int(v) for v in next(images))
                grid_h, grid_w = h // merge, w // merge
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
                pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current)
                current += max(grid_h, grid_w)
            start = end
        if pieces:
            positions[:, row, keep] = np.concatenate(pieces, axis=1)
    return positions


def vision_patch_positions(h: int, w: int, merge: int) -> np.ndarray:
    """``(h * w, 2)`` (row, column) of each patch in the processor's order (merge blocks of merge x merge)."""
    rows, columns = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return np.stack([a.reshape(shape).transpose(0, 2, 1, 3).ravel() for a in (rows, columns)], axis=-1)


def vision_windows(h: int, w: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window order of one image's merged tokens and each token's window number (in that order).

    ``window``: the window side in merged tokens (``window_size // merge // patch_size``); the numbers are
    transformers' ``get_vision_window_index`` for one still image.
    """
    grid_h, grid_w = h // merge, w // merge
    index = np.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    pad_h, pad_w = window - grid_h % window, window - grid_w % window
    padded = np.pad(index, ((0, pad_h), (0, pad_w)), constant_values=-100)
    windows_h, windows_w = padded.shape[0] // window, padded.shape[1] // window
    padded = padded.reshape(windows_h, window, windows_w, window).transpose(0, 2, 1, 3).reshape(-1, window * window)
    order = padded[padded != -100]
    window_of = np.repeat(np.arange(padded.shape[0]), (padded != -100).sum(axis=1))
    return order.astype(np.int64), window_of


class Qwen25VLAdapter(ModelAdapter):
    """Qwen2.5-VL family (``Qwen2_5_VLForConditionalGeneration``; Lingshu)."""

    family: ClassVar[str] = "qwen2_5_vl"
    box_space: ClassVar[BoxSpace] = BoxSpace(scale=None)
    scale_words: ClassVar[str] = "absolute pixel coordinates"
    patch_size: ClassVar[int] = 14
    default_min_pixels: ClassVar[int] = 56 * 56
    default_max_pixels: ClassVar[int] = 28 * 28 * 1280

    @cached_property
    def _processor_config(self) -> dict[str, Any]:
        path = self.checkpoint_dir() / "preprocessor_config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def resize_rule(self) -> tuple[int, int, int]:
        """(factor, min_pixels, max_pixels) from the checkpoint's image processor, capped by max_image_side."""
        config = self._processor_config
        raw_size = config.get("size")
        size: dict[str, Any] = raw_size if isinstance(raw_size, dict) else {}
        min_pixels = int(config.get("min_pixels") or size.get("shortest_edge") or self.default_min_pixels)
        max_pixels = int(config.get("max_pixels") or size.get("longest_edge") or self.default_max_pixels)
        factor = int(config.get("patch_size", self.patch_size)) * int(config.get("merge_size", 2))
        cap = self.settings.max_image_side**2
        return factor, min_pixels, max(min_pixels, min(max_pixels, cap))

    def prepare_image(self, image: ModelImage) -> tuple[np.ndarray, ImageTransform]:
        factor, min_pixels, max_pixels = self.resize_rule()
        rows, columns = smart_resize(image.rows, image.columns, factor, min_pixels, max_pixels)
        transform = ImageTransform.identity(image.columns, image.rows).resize(columns, rows)
        return resample(image.pixels, columns, rows), transform

    def build_prompt(self, request: TaskRequest, transform: ImageTransform) -> Prompt:
        numbers = self.box_space.from_source(request.region.box, transform) if request.region else None
        return Prompt(text=json_box_prompt(request, numbers, "bbox_2d", self.scale_words))

    def parse(self, text: str, item: PreparedInput) -> ParsedAnswer:
        return build_answer(parse_json_boxes(text, key="bbox_2d"), self.box_space, item, text)

    def hf_expand_image_tokens(self, handle: HFHandle, text: str, image_inputs: Mapping[str, Any], index: int) -> str:
        merge = int(getattr(handle.processor, "merge_size", 2))
        count = int(image_inputs["image_grid_thw"][index].prod()) // (merge * merge)
        return text.replace(IMAGE_PAD, IMAGE_PAD * count, 1)

    def hf_model_inputs(
        self, handle: HFHandle, image_inputs: dict[str, Any], text_inputs: dict[str, Any]
    ) -> dict[str, Any]:
        """Text and image inputs plus ``mm_token_type_ids``, as the processor's ``return_mm_token_type_ids``.

        ``get_rope_index`` reads it to find the image tokens; without it generation gives them 1-D positions.
        Only image tokens are marked (the adapter sends no video; the processor would mark a video token 2).
        """
        ids = text_inputs["input_ids"]
        token_types = (ids == int(handle.config.image_token_id)).long()
        return {**text_inputs, **image_inputs, "mm_token_type_ids": token_types}

    # -- ONNX export --
    export_unsupported: ClassVar[str] = ""

    def export_plan(self, handle: HFHandle) -> Any:
        """The vision tower one image at a time (window order and masks from the host), a 3-row M-RoPE decoder."""
        import torch

        from inference.export.modules import GraphSpec, standard_plan
        from inference.export.qwen import Qwen25Vision

        dtype = handle.model.dtype
        tokens = torch.export.Dim("tokens")
        patches = 4 * tokens
        example, check = (self._vision_example(handle, grid, dtype) for grid in ((6, 8), (10, 4)))
        spec = GraphSpec(
            "vision", Qwen25Vision(handle.model), example, list(self.vision_inputs), ["image_features"],
            {"pixel_values": {0: patches}, "position_ids": {0: patches}, "window_mask": {0: patches, 1: patches},
             "reverse_index": {0: tokens}},
            checks=[check],
        )
        plan = standard_plan(handle.model, handle.tokenizer, spec, dtype, position_rows=3)
        plan.dim_ranges.update(self.token_ranges())
        return plan

    def token_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of one image's merged tokens and patches (TensorRT profiles), from the resize rule."""
        factor, min_pixels, max_pixels = self.resize_rule()
        low, high = max(1, min_pixels // factor**2), max(1, max_pixels // factor**2)
        opt = min(high, max(low, 256))
        return {"tokens": (low, opt, high), "4*tokens": (4 * low, 4 * opt, 4 * high)}

    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "position_ids", "window_mask", "reverse_index")

    def _vision_example(self, handle: HFHandle, grid: tuple[int, int], dtype: Any) -> tuple[Any, ...]:
        import torch

        vision = handle.config.vision_config
        width = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
        pixels = np.random.default_rng(0).standard_normal((grid[0] * grid[1], width)).astype(np.float32)
        feeds = self.vision_feed(handle, pixels, grid[0], grid[1])
        return tuple(
            torch.from_numpy(feeds[name]).to(dtype) if feeds[name].dtype == np.float32
            else torch.from_numpy(feeds[name]) for name in self.vision_inputs
        )

    def vision_feed(self, handle: HFHandle, pixels: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs for one image's patches ``(h * w, features)`` (processor order)."""
        vision = handle.config.vision_config
        merge = int(vision.spatial_merge_size)
        unit = merge * merge
        window = int(vision.window_size) // merge // int(vision.patch_size)
        order, window_of = vision_windows(h, w, merge, window)
        rows = (order[:, None] * unit + np.arange(unit)).ravel()
        windows = np.repeat(window_of, unit)
        return {
            "pixel_values": np.ascontiguousarray(pixels[rows], dtype=np.float32),
            "position_ids": vision_patch_positions(h, w, merge)[rows].astype(np.int64),
            "window_mask": windows[:, None] == windows[None, :],
            "reverse_index": np.argsort(order).astype(np.int64),
        }

    def export_encode(self, handle: HFHandle, batch: Sequence[PreparedInput]) -> GraphInputs:
        """Token ids, M-RoPE positions (as ``get_rope_index``) and one vision feed per image."""
        image_inputs, ids, mask = self.export_tokens(handle, batch)
        grids = np.asarray(image_inputs["image_grid_thw"], dtype=np.int64)
        pixels = np.asarray(image_inputs["pixel_values"], dtype=np.float32)
        merge = int(handle.config.vision_config.spatial_merge_size)
        feeds: list[dict[str, np.ndarray]] = []
        start = 0
        for t, h, w in grids.tolist():
            count = t * h * w
            feeds.append(self.vision_feed(handle, pixels[start : start + count], h, w))
            start += count
        positions = mrope_positions(ids, mask, int(handle.config.image_token_id), grids.tolist(), merge)
        return GraphInputs(ids, mask, positions, feeds)


class Qwen3VLAdapter(Qwen25VLAdapter):
    """Qwen3-VL family (``Qwen3VLForConditionalGeneration``): the same JSON, relative 0..1000."""

    family: ClassVar[str] = "qwen3_vl"
    box_space: ClassVar[BoxSpace] = BoxSpace(scale=1000)
    scale_words: ClassVar[str] = "relative coordinates from 0 to 1000"
    patch_size: ClassVar[int] = 16
    default_min_pixels: ClassVar[int] = 64 * 64
    default_max_pixels: ClassVar[int] = 32 * 32 * 1280
    # -- ONNX export --
    vision_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "position_ids", "interp_indices", "interp_weights")

    def export_plan(self, handle: HFHandle) -> Any:
        """The vision tower one image at a time, its deepstack features as a second output; a 3-row M-RoPE decoder
        that adds them to its first layers' image-token states (``visual_pos_masks``, ``deepstack_features``)."""
        import torch

        from inference.export.modules import GraphSpec, standard_plan
        from inference.export.qwen import DeepstackLanguageModel, Qwen3Vision

        dtype = handle.model.dtype
        patches = 4 * torch.export.Dim("tokens")
        example, check = (self._vision_example(handle, grid, dtype) for grid in ((6, 8), (10, 4)))
        spec = GraphSpec(
            "vision", Qwen3Vision(handle.model), example, list(self.vision_inputs),
            ["image_features", "deepstack_features"], {name: {0: patches} for name in self.vision_inputs},
            checks=[check],
        )
        config = handle.config
        layers = len(config.vision_config.deepstack_visual_indexes)
        hidden = int(config.text_config.hidden_size)
        image_tokens = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.int64)
        extras = [
            ("visual_pos_masks", image_tokens, {0: "batch", 1: "seq"}),
            ("deepstack_features", torch.randn(4, layers, hidden, dtype=dtype), {0: "visual"}),
        ]
        plan = standard_plan(handle.model, handle.tokenizer, spec, dtype, position_rows=3, extras=extras,
                             language_model=DeepstackLanguageModel(handle.model.model.language_model))
        ranges = self.token_ranges()
        # The image tokens of a whole batch in the prefill, none in a decode step (the optimum).
        plan.dim_ranges.update({**ranges, "visual": (0, 0, 16 * ranges["tokens"][2])})
        return plan

    def vision_feed(self, handle: HFHandle, pixels: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs for one image's patches ``(h * w, features)`` (processor order)."""
        import torch
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        vision = handle.config.vision_config
        merge = int(vision.spatial_merge_size)
        indices, weights = get_vision_interpolation_indices_and_weights(
            torch.tensor([[1, h, w]]), num_grid_per_side=int(int(vision.num_position_embeddings) ** 0.5),
            mode="bilinear", align_corners=True, spatial_merge_size=merge,
        )
        return {
            "pixel_values": np.ascontiguousarray(pixels, dtype=np.float32),
            "position_ids": vision_patch_positions(h, w, merge).astype(np.int64),
            "interp_indices": indices.numpy().astype(np.int64),
            "interp_weights": weights.numpy().astype(np.float32),
        }

    def export_encode(self, handle: HFHandle, batch: Sequence[PreparedInput]) -> GraphInputs:
        """As Qwen2.5-VL's, plus ``visual_pos_masks`` (1 on image tokens in the prefill, 0 in each decode step)."""
        inputs = super().export_encode(handle, batch)
        image_tokens = (inputs.input_ids == int(handle.config.image_token_id)).astype(np.int64)
        inputs.prefill_extras["visual_pos_masks"] = image_tokens
        inputs.decode_extras["visual_pos_masks"] = np.zeros((image_tokens.shape[0], 1), dtype=np.int64)
        return inputs
