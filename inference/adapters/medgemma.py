"""MedGemma (Gemma 3, ``Gemma3ForConditionalGeneration``): JSON ``box_2d`` = [y0, x0, y1, x1] on 0..1000.

MedGemma localises on the image padded to a square; the adapter pads (centred, black) and resizes the square to
the image processor's size itself, both recorded, so a box maps back to the unpadded source exactly and boxes in
the padding are dropped. ``<start_of_image>`` expands to ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x
``mm_tokens_per_image`` + ``<end_of_image>\\n\\n`` as Gemma 3's processor does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from inference.adapters.base import HFHandle, ModelAdapter
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace, build_answer, parse_json_boxes
from inference.pixels import pad, resample
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

__all__ = ["MedGemmaAdapter", "medgemma_prompt"]

BOI = "<start_of_image>"
SYSTEM_EN = "You are an expert radiologist."
SYSTEM_ZH = "你是一名放射科专家。"


def medgemma_prompt(request: TaskRequest, region_numbers: tuple[float, ...] | None) -> str:
    zh = request.language is Language.CHINESE
    noun = modality_noun(request.modality, request.language)
    targets = list(request.targets) or list(DEFAULT_TARGETS[request.language])
    names = ("、" if zh else ", ").join(targets)
    shape = '{"box_2d": [y0, x0, y1, x1], "label": "..."}'
    if request.profile is Profile.GROUNDED_REPORT:
        if zh:
            return (
                f"{IMAGE_PLACEHOLDER}\n请为这张{noun}撰写诊断报告（影像诊断和影像结论），并定位{names}及所见病变。"
                f"最后以 Final Answer: ```json [{shape}]``` 输出边界框（0到1000，在补成正方形的图像上）。"
            )
        return (
            f"{IMAGE_PLACEHOLDER}\nWrite a radiology report (findings and impression) for this {noun}, and locate "
            f"the {names} and any lesion. Finish with Final Answer: ```json [{shape}]``` with coordinates "
            "scaled 0 to 1000 on the image padded to a square."
        )
    if request.profile is Profile.TEXT_TO_REGION:
        if zh:
            return (
                f"{IMAGE_PLACEHOLDER}\n请定位这张{noun}中的{names}。以 Final Answer: ```json [{shape}]``` 输出"
                "（0到1000，在补成正方形的图像上）。"
            )
        return (
            f"{IMAGE_PLACEHOLDER}\nLocate the {names} in this {noun}. Output the final answer in the format "
            f"Final Answer: ```json [{shape}]``` with coordinates scaled 0 to 1000 on the image padded to a square."
        )
    if request.profile is Profile.REGION_TO_TEXT:
        box = json.dumps([round(v) for v in (region_numbers or (0, 0, 1000, 1000))])
        if zh:
            return (
                f"{IMAGE_PLACEHOLDER}\n这张{noun}中 box_2d {box}（[y0, x0, y1, x1]，0到1000）内是什么结构？"
                "请用词或短语回答。"
            )
        return (
            f"{IMAGE_PLACEHOLDER}\nWhat is the structure inside box_2d {box} ([y0, x0, y1, x1], 0 to 1000) of "
            f"this {noun}? Answer using a single word or phrase."
        )
    return f"{IMAGE_PLACEHOLDER}\n{request.question.strip()}"


class MedGemmaAdapter(ModelAdapter):
    """MedGemma 4B multimodal and 27B multimodal."""

    family: ClassVar[str] = "medgemma"
    box_space: ClassVar[BoxSpace] = BoxSpace(scale=1000)
    default_side: ClassVar[int] = 896

    @cached_property
    def side(self) -> int:
        """The square side of the image processor (896 for MedGemma)."""
        try:
            data = json.loads((self.checkpoint_dir() / "preprocessor_config.json").read_text(encoding="utf-8"))
            size = data.get("size", {})
            return int(size.get("height") or size.get("shortest_edge") or self.default_side)
        except (OSError, ValueError, AttributeError, TypeError):
            return self.default_side

    def prepare_image(self, image: ModelImage) -> tuple[np.ndarray, ImageTransform]:
        transform = ImageTransform.identity(image.columns, image.rows).pad_to_square()
        (left, top), (side, _) = (
            (round(transform.tx), round(transform.ty)),
            transform.output_size,
        )
        squared = pad(image.pixels, left, top, side - image.columns - left, side - image.rows - top)
        transform = transform.resize(self.side, self.side)
        return resample(squared, self.side, self.side), transform

    def build_prompt(self, request: TaskRequest, transform: ImageTransform) -> Prompt:
        numbers = None
        if request.region is not None:
            x0, y0, x1, y1 = self.box_space.from_source(request.region.box, transform)
            numbers = (y0, x0, y1, x1)
        system = SYSTEM_ZH if request.language is Language.CHINESE else SYSTEM_EN
        return Prompt(text=medgemma_prompt(request, numbers), system=system)

    def parse(self, text: str, item: PreparedInput) -> ParsedAnswer:
        return build_answer(parse_json_boxes(text, key="box_2d", order="yxyx"), self.box_space, item, text)

    def hf_expand_image_tokens(self, handle: HFHandle, text: str, image_inputs: Mapping[str, Any], index: int) -> str:
        config = handle.config
        soft = handle.tokenizer.convert_ids_to_tokens(int(config.image_token_index))
        eoi = handle.tokenizer.convert_ids_to_tokens(int(config.eoi_token_index))
        tokens = f"\n\n{BOI}{soft * int(config.mm_tokens_per_image)}{eoi}\n\n"
        return text.replace(BOI, tokens, 1)

    def hf_model_inputs(
        self, handle: HFHandle, image_inputs: dict[str, Any], text_inputs: dict[str, Any]
    ) -> dict[str, Any]:
        ids = text_inputs["input_ids"]
        token_type_ids = (ids == int(handle.config.image_token_index)).long()
        return {**text_inputs, "token_type_ids": token_type_ids, "pixel_values": image_inputs["pixel_values"]}

    # -- ONNX export --
    export_unsupported: ClassVar[str] = ""

    def export_plan(self, handle: HFHandle) -> Any:
        """SigLIP and the projector on a batch of square images; the Gemma 3 model on embeddings with
        ``token_type_ids``, so its image tokens attend to each other both ways in the prefill as transformers does
        (its sliding-window layers keep the whole cache; the mask hides what lies outside the window)."""
        import torch

        from inference.export.modules import ImageFeatures, image_batch_spec, standard_plan

        config = handle.config
        side = int(config.vision_config.image_size)
        dtype = handle.model.dtype
        spec = image_batch_spec(ImageFeatures(handle.model), int(config.vision_config.num_channels), side, side, dtype)
        token_types = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.int64)
        return standard_plan(
            handle.model, handle.tokenizer, spec, dtype,
            extras=[("token_type_ids", token_types, {0: "batch", 1: "seq"})], language_model=handle.model.model,
        )

    def export_encode(self, handle: HFHandle, batch: Sequence[PreparedInput]) -> GraphInputs:
        """The default inputs plus ``token_type_ids``: 1 on image tokens in the prefill, 0 for each new token."""
        inputs = super().export_encode(handle, batch)
        token_types = (inputs.input_ids == int(handle.config.image_token_index)).astype(np.int64)
        inputs.prefill_extras["token_type_ids"] = token_types
        inputs.decode_extras["token_type_ids"] = np.zeros((token_types.shape[0], 1), dtype=np.int64)
        return inputs

    def hf_generate_kwargs(self, handle: HFHandle) -> dict[str, Any]:
        kwargs = super().hf_generate_kwargs(handle)
        end_of_turn = handle.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        eos = [handle.tokenizer.eos_token_id]
        if isinstance(end_of_turn, int) and end_of_turn != handle.tokenizer.unk_token_id:
            eos.append(end_of_turn)
        kwargs["eos_token_id"] = [e for e in eos if e is not None]
        return kwargs
