"""Task profiles: what each profile asks for, its generation cap, and the generic bilingual prompts.

Families with a published prompt style write their own prompts (MedRegA's are in
:mod:`inference.adapters.medrega`, verbatim from the model's repository); the generic prompts here serve the
families whose grounding prompt is a plain instruction (InternVL3, Qwen2.5-VL, Qwen3-VL, MedGemma).
"""

from __future__ import annotations

from collections.abc import Sequence

from inference.types import IMAGE_PLACEHOLDER, Profile
from sr_writer.findings import Language

__all__ = [
    "DEFAULT_TARGETS",
    "MAX_NEW_TOKENS",
    "default_max_new_tokens",
    "modality_noun",
]

#: Generation caps per profile: a grounded report needs room (MedRegA's demo uses 400), a region name does
#: not.
MAX_NEW_TOKENS: dict[Profile, int] = {
    Profile.GROUNDED_REPORT: 400,
    Profile.TEXT_TO_REGION: 160,
    Profile.REGION_TO_TEXT: 32,
    Profile.VQA: 64,
}

#: Structures described/located when a rule names none.
DEFAULT_TARGETS: dict[Language, tuple[str, ...]] = {
    Language.ENGLISH: ("right lung", "left lung"),
    Language.CHINESE: ("右肺", "左肺"),
}

_MODALITY_NOUNS: dict[str, dict[Language, str]] = {
    "CR": {Language.ENGLISH: "x-ray image", Language.CHINESE: "X光影像"},
    "DX": {Language.ENGLISH: "x-ray image", Language.CHINESE: "X光影像"},
    "CT": {Language.ENGLISH: "CT scan", Language.CHINESE: "CT影像"},
    "MR": {Language.ENGLISH: "MRI scan", Language.CHINESE: "MRI影像"},
    "US": {Language.ENGLISH: "ultrasound image", Language.CHINESE: "超声影像"},
}


def default_max_new_tokens(profile: Profile | str) -> int:
    """The profile's own cap on generated tokens."""
    return MAX_NEW_TOKENS[Profile(profile)]


def modality_noun(modality: str, language: Language | str) -> str:
    """How a prompt names the image: "chest x-ray image"-style nouns per modality ("medical image"
    otherwise)."""
    lang = Language(language)
    nouns = _MODALITY_NOUNS.get(modality.upper())
    if nouns is None:
        return "medical image" if lang is Language.ENGLISH else "医学影像"
    return nouns[lang]


def join_targets(targets: Sequence[str], language: Language) -> str:
    if language is Language.CHINESE:
        return "、".join(targets)
    return ", ".join(targets)


__all__ += ["IMAGE_PLACEHOLDER", "join_targets"]
