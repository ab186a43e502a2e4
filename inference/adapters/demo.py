"""Adapter of the built-in demonstration model (``model.family: demo``).

The demonstration model is a small LLaVA-architecture checkpoint trained by the project on synthetic phantoms
(:mod:`inference.demo`); it is NOT for clinical use, and every answer it gives says so. It answers in the MedRegA
grounded format, ``<ref>label</ref><box>[[x1, y1, x2, y2]]</box>`` on the 0..999 scale relative to the image,
in English or Chinese, and knows the labels it was trained on: nodule/结节, opacity/阴影, right lung/右肺,
left lung/左肺, heart/心脏.

Profiles: ``grounded_report`` and ``text_to_region`` are what it was trained for. ``region_to_text`` runs the
grounded report and names the finding that overlaps the marked region best; ``vqa`` answers with the grounded
report. Targets outside its vocabulary come back as text-only findings saying so.

With ``model.path`` unset it loads the packaged checkpoint under ``inference/demo/checkpoint/``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from inference.adapters.base import HFHandle, ModelAdapter, checkpoint_fingerprint
from inference.demo import (
    CHECKPOINT_DIR,
    DISCLAIMER,
    MODEL_NAME,
)
from inference.demo.data import model_pixels
from inference.demo.texts import (
    TARGETS_EN,
    TARGETS_ZH,
    english_label,
    prompt_grounded_report,
    prompt_text_to_region,
)
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace, ParsedRegions, parse_ref_boxes, regions_to_findings
from inference.types import IMAGE_PLACEHOLDER, ModelImage, ParsedAnswer, PreparedInput, Profile, Prompt, TaskRequest
from sr_writer.findings import AlgorithmIdentity, Finding, Language

__all__ = ["DemoAdapter"]

logger = logging.getLogger(__name__)

#: Answers a target that is absent with ``<ref>label</ref>: none`` (Chinese ``：未见``).
_ABSENT = {"none", "未见"}


class DemoAdapter(ModelAdapter):
    """The demonstration model: LLaVA architecture, MedRegA box format (0..999), packaged checkpoint."""

    family: ClassVar[str] = "demo"
    box_space: ClassVar[BoxSpace] = BoxSpace(scale=999.0)

    def checkpoint_dir(self) -> Path:
        if self.settings.path is None:
            return CHECKPOINT_DIR
        return Path(self.settings.path).expanduser()

    def identity(self, directory: Path) -> AlgorithmIdentity:
        return AlgorithmIdentity(
            name=MODEL_NAME,
            version=checkpoint_fingerprint(directory),
            family=self.family,
            parameters={"decoding": "greedy", "training data": "synthetic phantoms", "intended use": "demonstration"},
        )

    # -- pre-process --
    def prepare_image(self, image: ModelImage) -> tuple[np.ndarray, ImageTransform]:
        return model_pixels(image.pixels)

    def _known_targets(self, request: TaskRequest) -> tuple[list[str], list[str]]:
        """(targets the model knows, in the request's language; targets it does not know)."""
        zh = request.language is Language.CHINESE
        known, unknown = [], []
        for target in request.targets:
            english = english_label(target)
            if english in TARGETS_EN:
                known.append(TARGETS_ZH[TARGETS_EN.index(english)] if zh else english)
            else:
                unknown.append(target)
        return known, unknown

    def build_prompt(self, request: TaskRequest, transform: ImageTransform) -> Prompt:
        language = request.language.value
        if request.profile is Profile.TEXT_TO_REGION:
            known, _ = self._known_targets(request)
            if not known:  # nothing it knows was asked: look for the lesions it knows
                known = list(TARGETS_ZH[:2] if language == "zh" else TARGETS_EN[:2])
            return Prompt(prompt_text_to_region(known, language))
        # grounded_report, and region_to_text / vqa answered from the grounded report
        return Prompt(prompt_grounded_report(language))

    # -- transformers backend --
    def hf_expand_image_tokens(self, handle: HFHandle, text: str, image_inputs: Mapping[str, Any], index: int) -> str:
        """LLaVA: the ``<image>`` placeholder becomes one token per vision patch (the CLS token is dropped)."""
        vision = handle.config.vision_config
        count = (int(vision.image_size) // int(vision.patch_size)) ** 2
        return text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * count, 1)

    # -- ONNX export --
    export_unsupported: ClassVar[str] = ""

    def export_plan(self, handle: HFHandle) -> Any:
        """LLaVA: the vision tower and projector on a batch of 128 x 128 images, a Llama decoder."""
        import torch

        from inference.export.modules import GraphSpec, LlavaVision, standard_plan

        vision = handle.config.vision_config
        side = int(vision.image_size)
        images = torch.export.Dim("images")
        dtype = handle.model.dtype
        spec = GraphSpec(
            "vision", LlavaVision(handle.model), (torch.randn(2, 3, side, side, dtype=dtype),), ["pixel_values"],
            ["image_features"], {"pixel_values": {0: images}},
            checks=[(torch.randn(3, 3, side, side, dtype=dtype),)],
        )
        return standard_plan(handle.model, handle.tokenizer, spec, dtype)

    # -- post-process --
    def parse(self, text: str, item: PreparedInput) -> ParsedAnswer:
        request = item.request
        language = request.language
        parsed = parse_ref_boxes(text)
        kept = tuple(r for r in parsed.regions if r.boxes or r.text.strip(" .。") not in _ABSENT)
        parsed = ParsedRegions(kept, parsed.narrative, parsed.problems)
        findings, problems = regions_to_findings(
            parsed, self.box_space, item.transform, item.image.ref, language, default_label="lesion"
        )
        if request.profile is Profile.TEXT_TO_REGION:
            _, unknown = self._known_targets(request)
            note = ("不在演示模型的词表中" if language is Language.CHINESE
                    else "not in the demonstration model's vocabulary")
            findings += [Finding(label=t, text=note, language=language) for t in unknown]
        narrative = parsed.narrative
        if request.profile is Profile.REGION_TO_TEXT and request.region is not None:
            findings, narrative = self._name_region(findings, request, language)
        disclaimer = DISCLAIMER[language]
        narrative = f"{narrative} {disclaimer}".strip() if narrative else disclaimer
        return ParsedAnswer(tuple(findings), narrative, tuple(problems))

    @staticmethod
    def _name_region(
        findings: list[Finding], request: TaskRequest, language: Language
    ) -> tuple[list[Finding], str]:
        """The finding that overlaps the marked region best (IoU > 0.1), as the region's name."""
        assert request.region is not None
        region = request.region.box
        best = max(
            (f for f in findings if f.box is not None), key=lambda f: f.box.iou(region) if f.box else 0.0,
            default=None,
        )
        if best is None or best.box is None or best.box.iou(region) <= 0.1:
            answer = "未见明确病灶" if language is Language.CHINESE else "no focal lesion"
            return [], answer
        return [best], best.label
