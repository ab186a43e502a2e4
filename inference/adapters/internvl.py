"""InternVL3 ``-hf`` checkpoints (``InternVLForConditionalGeneration``): ``<ref>/<box>`` answers on 0..1000.

The image goes to the checkpoint's image processor (448-pixel tiles, ``crop_to_patches``); the chat template
writes ``<IMG_CONTEXT>`` where the image is, which expands to ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x
tiles) + ``</img>`` as InternVL's processor does. Boxes are relative to the whole image the processor received,
on 0..1000, so the only geometry recorded here is an optional down-sampling to ``model.max_image_side``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from inference.adapters.base import HFHandle, ModelAdapter
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace, format_ref_box, parse_ref_box_answer
from inference.pixels import resample
from inference.profiles import DEFAULT_TARGETS, modality_noun
from inference.types import IMAGE_PLACEHOLDER, ModelImage, ParsedAnswer, PreparedInput, Profile, Prompt, TaskRequest
from sr_writer.findings import Language

__all__ = ["InternVLAdapter", "fit_within", "ref_box_prompt"]

IMG_CONTEXT = "<IMG_CONTEXT>"


def fit_within(image: ModelImage, max_side: int) -> tuple[np.ndarray, ImageTransform]:
    """The image down-sampled (aspect kept) so that its longer side is at most ``max_side``."""
    transform = ImageTransform.identity(image.columns, image.rows)
    longer = max(image.columns, image.rows)
    if longer <= max_side:
        return image.pixels, transform
    columns = max(1, round(image.columns * max_side / longer))
    rows = max(1, round(image.rows * max_side / longer))
    return resample(image.pixels, columns, rows), transform.resize(columns, rows)


def ref_box_prompt(request: TaskRequest, region_numbers: tuple[float, ...] | None, scale: int) -> str:
    """A grounding prompt for models that answer with ``<ref>/<box>`` tags on 0..``scale``."""
    zh = request.language is Language.CHINESE
    noun = modality_noun(request.modality, request.language)
    targets = list(request.targets) or list(DEFAULT_TARGETS[request.language])
    if request.profile is Profile.GROUNDED_REPORT:
        refs = ("、" if zh else ", ").join(f"<ref>{t}</ref>" for t in targets)
        if zh:
            return (
                f"{IMAGE_PLACEHOLDER}\n请为这张{noun}撰写诊断报告，并用<ref>名称</ref><box>[[x1, y1, x2, y2]]</box>"
                f"（0到{scale}）定位并描述{refs}，每个区域后写出“：描述”。"
            )
        return (
            f"{IMAGE_PLACEHOLDER}\nWrite a radiology report for this {noun}. Locate and describe {refs}: give "
            f'each as <ref>name</ref><box>[[x1, y1, x2, y2]]</box> (0 to {scale}) followed by ": description".'
        )
    if request.profile is Profile.TEXT_TO_REGION:
        refs = ("、" if zh else ", ").join(f"<ref>{t}</ref>" for t in targets)
        if zh:
            return f"{IMAGE_PLACEHOLDER}\n请给出以下描述所对应区域的边界框坐标：{refs}"
        return (
            f"{IMAGE_PLACEHOLDER}\nPlease provide the bounding box coordinates of the regions these phrases "
            f"describe: {refs}"
        )
    if request.profile is Profile.REGION_TO_TEXT:
        box = format_ref_box("this" if not zh else "这个", region_numbers or (0, 0, scale, scale))
        if zh:
            return f"{IMAGE_PLACEHOLDER}\n这张{noun}中{box}是什么结构？请用词或短语回答。"
        return f"{IMAGE_PLACEHOLDER}\nWhat is {box} in this {noun}? Answer using a single word or phrase."
    return f"{IMAGE_PLACEHOLDER}\n{request.question.strip()}"


class InternVLAdapter(ModelAdapter):
    """InternVL3 in transformers' own implementation (no remote code)."""

    family: ClassVar[str] = "internvl"
    box_space: ClassVar[BoxSpace] = BoxSpace(scale=1000)

    def prepare_image(self, image: ModelImage) -> tuple[np.ndarray, ImageTransform]:
        return fit_within(image, self.settings.max_image_side)

    def build_prompt(self, request: TaskRequest, transform: ImageTransform) -> Prompt:
        numbers = self.box_space.from_source(request.region.box, transform) if request.region else None
        return Prompt(text=ref_box_prompt(request, numbers, 1000))

    def parse(self, text: str, item: PreparedInput) -> ParsedAnswer:
        return parse_ref_box_answer(text, item, self.box_space)

    def hf_image_inputs(self, handle: HFHandle, batch: Any) -> dict[str, Any]:
        return dict(handle.processor(images=self.hf_images(batch), crop_to_patches=True, return_tensors="pt"))

    def hf_expand_image_tokens(self, handle: HFHandle, text: str, image_inputs: Mapping[str, Any], index: int) -> str:
        patches = image_inputs["num_patches"]
        count = int(patches[index]) * int(handle.config.image_seq_length)
        return text.replace(IMG_CONTEXT, "<img>" + IMG_CONTEXT * count + "</img>", 1)

    def hf_model_inputs(
        self, handle: HFHandle, image_inputs: dict[str, Any], text_inputs: dict[str, Any]
    ) -> dict[str, Any]:
        return {**text_inputs, "pixel_values": image_inputs["pixel_values"]}

    # -- ONNX export --
    export_unsupported: ClassVar[str] = ""

    def export_plan(self, handle: HFHandle) -> Any:
        """The vision tower, pixel shuffle and projector on a batch of tiles; the Qwen2 (or Llama) decoder."""
        from inference.export.modules import ImageFeatures, image_batch_spec, standard_plan

        config = handle.config
        size = config.vision_config.image_size
        height, width = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        module = ImageFeatures(
            handle.model,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        dtype = handle.model.dtype
        spec = image_batch_spec(module, int(config.vision_config.num_channels), height, width, dtype)
        return standard_plan(handle.model, handle.tokenizer, spec, dtype)
