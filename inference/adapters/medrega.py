"""MedRegA (InternVL-Chat-V1-2 fine-tune): Hermes-2 ChatML, ``<ref>/<box>`` answers on 0..999.

Facts from the model's repository (see shared/reference/model-formats.md):

* one 448 x 448 tile, the image resized without padding, ImageNet mean/std; 256 ``<IMG_CONTEXT>`` tokens between
  ``<img>`` and ``</img>`` replace ``<image>`` in the question;
* Hermes-2 template ``<|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{question}<|im_end|>
  <|im_start|>assistant\\n``, system message "Answer the questions.", generation stops at ``<|im_end|>``;
* boxes ``<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>``, integers 0..999 of the original image
  (pixel = value / 999 x size);
* its modelling code ships with the checkpoint (``trust_remote_code``), slow tokenizer.

The prompts below are the published ones, verbatim, where the repository has them (English grounded report,
detection, recognition, report generation and VQA; Chinese grounded diagnosis, report generation and VQA); the
Chinese detection and recognition prompts follow the published Chinese wording of the same sentences.
:func:`inference.parsing.parse_ref_box_answer` reads the answers (InternVL3 and the demo model answer in the same
format).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from inference.adapters.base import HF_CHECKPOINT_FILES, HFHandle, ModelAdapter, WeightFiles
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace, format_ref_box, parse_ref_box_answer
from inference.pixels import resample
from inference.profiles import DEFAULT_TARGETS
from inference.types import IMAGE_PLACEHOLDER, ModelImage, ParsedAnswer, PreparedInput, Profile, Prompt, TaskRequest
from sr_writer.findings import Language

__all__ = [
    "MEDREGA_BOX_SPACE",
    "MedRegAAdapter",
    "medrega_prompt",
]

logger = logging.getLogger(__name__)

MEDREGA_BOX_SPACE = BoxSpace(scale=999)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HERMES_SYSTEM = "Answer the questions."
IM_END = "<|im_end|>"

_BOX_RULE_EN = (
    "The region is represented in the form of bounding box, [x1, y1, x2, y2], with integers ranging from 0 to 999. "
    "These values correspond to the top left x, top left y, bottom right x, and bottom right y."
)
_BOX_FORMAT_EN = (
    "For each object, please utilize this format to represent the region with its bounding box: "
    '"<ref>object</ref><box>[[x1, y1, x2, y2]]</box>".'
)
_BOX_RULE_ZH = (
    "区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。"
    "这些值分别对应左上角的x，左上角的y，右下角的x和右下角的y。"
)

_EN_NOUN = {"CR": "chest x-ray image", "DX": "chest x-ray image", "CT": "CT image", "MR": "MRI image"}
_EN_SCAN = {"CR": "X-ray image", "DX": "X-ray image", "CT": "CT scan", "MR": "MRI scan", "US": "ultrasound image"}


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" or noun.startswith(("MRI", "X-ray")) else "a ") + noun


def medrega_prompt(request: TaskRequest, modality: str = "", region_numbers: Sequence[float] | None = None) -> str:
    """MedRegA's question for ``request`` (with the ``<image>`` placeholder), in the request's language."""
    zh = request.language is Language.CHINESE
    modality = modality.upper()
    targets = list(request.targets)
    if request.profile is Profile.GROUNDED_REPORT:
        if not targets and modality in ("CR", "DX"):
            targets = list(DEFAULT_TARGETS[request.language])
        if zh:
            if not targets:
                return (
                    "你是一个医疗助手，你的任务是生成诊断报告。请为这张医学影像撰写诊断报告，需包括影像诊断和影像结论两部分。"
                    f"影像诊断描述可见信息，影响结论列举最终的诊断结果。{IMAGE_PLACEHOLDER}\n"
                )
            refs = "".join(f"<ref>{t}</ref>" for t in targets)
            return (
                "你是一个医疗助手，你的任务是定位并描述病种。"
                "病种区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。"
                "这些值分别对应左上角的x，左上角的y，右下角的x和右下角的y。对于每个病种，请使用这种格式用边界框表示区域："
                f'"<ref>病种</ref><box>[[x1, y1, x2, y2]]</box>：诊断"。{IMAGE_PLACEHOLDER}\n'
                f"请定位并描述这张医学影像中的{refs}"
            )
        noun = _EN_NOUN.get(modality, "medical image")
        if not targets:
            return (
                "You are a helpful medical assistant. Your task is report generation. You are given "
                f"{_article(noun)}, and you are required to generate a medical report consisting of findings and "
                f"impressions based on the image. {IMAGE_PLACEHOLDER}\n"
            )
        refs = ", ".join(f"<ref>{t}</ref>" for t in targets)
        return (
            "You are a helpful medical assistant. Your task is report phrase grounding. You are given "
            f"{_article(noun)}, and you are required to locate the region and generate a report for the given "
            f"organ. {_BOX_RULE_EN} {_BOX_FORMAT_EN} {IMAGE_PLACEHOLDER}\n"
            f"Please locate the region and describe the condition of {refs}"
        )
    if request.profile is Profile.TEXT_TO_REGION:
        targets = targets or list(DEFAULT_TARGETS[request.language])
        if zh:
            refs = "".join(f"<ref>{t}</ref>" for t in targets)
            return (
                f"你是一个医疗助手，你的任务是目标检测。你需要找到给定目标的所有区域。{_BOX_RULE_ZH}"
                f'对于每个目标，请使用这种格式用边界框表示区域："<ref>目标</ref><box>[[x1, y1, x2, y2]]</box>"。'
                f"{IMAGE_PLACEHOLDER}\n请定位这张医学影像中的{refs}"
            )
        refs = ", ".join(f"<ref>{t}</ref>" for t in targets)
        scan = _EN_SCAN.get(modality, "medical image")
        return (
            "You are a helpful medical assistant. Your task is object detection. You are required to find all the "
            f"regions of the given objects. {_BOX_RULE_EN} {_BOX_FORMAT_EN} {IMAGE_PLACEHOLDER}\n"
            f"Please locate {refs} in this {scan}."
        )
    if request.profile is Profile.REGION_TO_TEXT:
        numbers = region_numbers if region_numbers is not None else (0, 0, 999, 999)
        if zh:
            return (
                f"你是一个医疗助手，你的任务是目标识别。你需要识别给定区域中的目标。{_BOX_RULE_ZH}{IMAGE_PLACEHOLDER}\n"
                f"{format_ref_box('这个', numbers)}是什么？"
            )
        scan = _EN_SCAN.get(modality, "medical image")
        return (
            "You are a helpful medical assistant. Your task is object recognition. You are required to recognize "
            f"the object in the given region. {_BOX_RULE_EN} {IMAGE_PLACEHOLDER}\n"
            f"What is {format_ref_box('this', numbers)} in this {scan}?"
        )
    # VQA
    if zh:
        return f"你是一个医疗助手，你需要根据医学图像回答问题。{IMAGE_PLACEHOLDER}\n{request.question.strip()}"
    return (
        "You are a helpful medical assistant. You are required to answer the question based on the medical image. "
        f"{IMAGE_PLACEHOLDER}\n{request.question.strip()}"
    )


class MedRegAAdapter(ModelAdapter):
    """MedRegA through its own modelling code (``InternVLChatModel``; needs ``model.trust_remote_code: true``)."""

    family: ClassVar[str] = "medrega"
    needs_remote_code: ClassVar[bool] = True
    required_files: ClassVar[tuple[WeightFiles, ...]] = (
        HF_CHECKPOINT_FILES[0],
        HF_CHECKPOINT_FILES[1],
        WeightFiles("tokenizer", ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")),
        WeightFiles("modelling code (InternVLChatModel)", ("modeling_internvl_chat.py",)),
    )
    export_unsupported: ClassVar[str] = (
        "its modelling code (InternVLChatModel: InternViT-6B, MLP projector, Yi-34B) ships with the checkpoint as "
        "remote code written for transformers 4.x, outside transformers 5; its graphs could not be exported and "
        "proved token-equal to the transformers backend without that code, and the 40B model in bfloat16 (about "
        "80 GB) leaves no room for a KV cache on one 80 GB GPU anyway"
    )
    #: Side of the single square tile the vision encoder sees.
    image_size: ClassVar[int] = 448
    box_space: ClassVar[BoxSpace] = MEDREGA_BOX_SPACE

    # -- pre-process --
    def prepare_image(self, image: ModelImage) -> tuple[np.ndarray, ImageTransform]:
        side = self.image_size
        transform = ImageTransform.identity(image.columns, image.rows).resize(side, side)
        return resample(image.pixels, side, side), transform

    def build_prompt(self, request: TaskRequest, transform: ImageTransform) -> Prompt:
        numbers = None
        if request.region is not None:
            numbers = self.box_space.from_source(request.region.box, transform)
        return Prompt(text=medrega_prompt(request, request.modality, numbers), system=HERMES_SYSTEM)

    # -- post-process --
    def parse(self, text: str, item: PreparedInput) -> ParsedAnswer:
        return parse_ref_box_answer(text, item, self.box_space)

    # -- transformers backend hooks --
    def hf_model_class(self) -> Any:
        from transformers import AutoModel

        return AutoModel

    def hf_load(self, directory: Path, device: str, dtype: Any, attn_implementation: str) -> HFHandle:
        from transformers import AutoTokenizer

        trust = bool(self.settings.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust, use_fast=False
        )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = self.hf_model_class().from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust, dtype=dtype, low_cpu_mem_usage=True
        )
        model.to(device).eval()
        model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        return HFHandle(model=model, processor=None, tokenizer=tokenizer, extras={})

    def num_image_tokens(self, handle: HFHandle) -> int:
        """Image tokens per tile: the model's ``num_image_token``, else from its vision configuration."""
        value = getattr(handle.model, "num_image_token", None)
        if value:
            return int(value)
        config = handle.config
        vision = config.vision_config
        size = getattr(config, "force_image_size", None) or vision.image_size
        return int((size // vision.patch_size) ** 2 * (config.downsample_ratio**2))

    def hf_render(self, handle: HFHandle, item: PreparedInput) -> str:
        system = item.prompt.system or HERMES_SYSTEM
        return (
            f"<|im_start|>system\n{system}{IM_END}<|im_start|>user\n{item.prompt.text}{IM_END}<|im_start|>assistant\n"
        )

    def hf_image_inputs(self, handle: HFHandle, batch: Sequence[PreparedInput]) -> dict[str, Any]:
        import torch

        unit = np.stack([item.pixels for item in batch]).astype(np.float32) / np.float32(255.0)
        mean, std = np.array(IMAGENET_MEAN, dtype=np.float32), np.array(IMAGENET_STD, dtype=np.float32)
        normalised = ((unit - mean) / std).astype(np.float32)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))}

    def hf_expand_image_tokens(self, handle: HFHandle, text: str, image_inputs: Mapping[str, Any], index: int) -> str:
        tokens = "<img>" + "<IMG_CONTEXT>" * self.num_image_tokens(handle) + "</img>"
        if IMAGE_PLACEHOLDER not in text:
            text = text.replace("<|im_start|>user\n", f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n", 1)
        return text.replace(IMAGE_PLACEHOLDER, tokens, 1)

    def hf_model_inputs(
        self, handle: HFHandle, image_inputs: dict[str, Any], text_inputs: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "pixel_values": image_inputs["pixel_values"],
            "input_ids": text_inputs["input_ids"],
            "attention_mask": text_inputs["attention_mask"],
        }

    def hf_generate_kwargs(self, handle: HFHandle) -> dict[str, Any]:
        kwargs = super().hf_generate_kwargs(handle)
        kwargs["eos_token_id"] = handle.tokenizer.convert_tokens_to_ids(IM_END)
        return kwargs

    def hf_new_tokens(self, sequences: Any, encoded: Mapping[str, Any]) -> Any:
        # InternVLChatModel.generate feeds input embeddings, so its output holds only the new tokens; a model that
        # echoes the prompt is handled too.
        prompt = encoded["input_ids"]
        length = prompt.shape[1]
        if sequences.shape[1] >= length and bool((sequences[:, :length].cpu() == prompt.cpu()).all()):
            return sequences[:, length:]
        return sequences

    def hf_decode(self, handle: HFHandle, sequences: Any, encoded: Mapping[str, Any]) -> list[str]:
        texts = handle.tokenizer.batch_decode(self.hf_new_tokens(sequences, encoded), skip_special_tokens=True)
        return [t.split(IM_END, 1)[0].strip() for t in texts]
