"""Prompts and answers of the demonstration model, English and Chinese, in the MedRegA grounded format.

Boxes are written ``<ref>label</ref><box>[[x1, y1, x2, y2]]</box>`` with integers on MedRegA's 0..999 scale
relative to the image (pixel = value / 999 x size). The demonstration model's tokenizer has one token per
coordinate on a grid of step :data:`COORD_STEP` (0, 8, ..., 992) plus 999, so its answers use that grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.demo.phantoms import ANATOMY, LESIONS, Phantom, Structure
from sr_writer.findings import BoundingBox

__all__ = [
    "CHAT_TEMPLATE",
    "COORD_STEP",
    "COORD_VALUES",
    "IMAGE_TOKEN",
    "IM_END",
    "IM_START",
    "TARGETS_EN",
    "TARGETS_ZH",
    "all_texts",
    "answer_grounded_report",
    "answer_text_to_region",
    "chat_prompt",
    "prompt_grounded_report",
    "prompt_text_to_region",
    "quantise",
    "relative_box",
]

COORD_STEP = 8
#: Every coordinate the model can write.
COORD_VALUES: tuple[int, ...] = (*range(0, 999, COORD_STEP), 999)
IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

#: Chat template (ChatML, as MedRegA's Hermes-2 template, no system turn) stored with the processor.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Targets the model was trained to locate (text_to_region), English and Chinese.
TARGETS_EN: tuple[str, ...] = (*LESIONS, *ANATOMY)
TARGETS_ZH: tuple[str, ...] = (*LESIONS.values(), *ANATOMY.values())
_ZH = {**LESIONS, **ANATOMY}
_EN = {v: k for k, v in _ZH.items()}

_SIDE_ZH = {"right": "右", "left": "左"}
_ZONE_ZH = {"upper": "上", "middle": "中", "lower": "下"}
_SIZE_ZH = {"small": "小", "large": "大"}


def quantise(value: float) -> int:
    """The nearest coordinate on the model's grid (0..999)."""
    v = float(np.clip(value, 0.0, 999.0))
    return min(COORD_VALUES, key=lambda c: abs(c - v))


def relative_box(box: BoundingBox, columns: int, rows: int) -> tuple[int, int, int, int]:
    """A source-pixel box as quantised 0..999 integers (value = pixel / size x 999)."""
    return (
        quantise(box.x0 / columns * 999), quantise(box.y0 / rows * 999),
        quantise(box.x1 / columns * 999), quantise(box.y1 / rows * 999),
    )


def _boxes(boxes: Sequence[tuple[int, int, int, int]]) -> str:
    return "<box>[" + ", ".join(f"[{a}, {b}, {c}, {d}]" for a, b, c, d in boxes) + "]</box>"


def _label(label_en: str, language: str) -> str:
    return _ZH[label_en] if language == "zh" else label_en


def chat_prompt(user_text: str) -> str:
    """The full model input text for one user turn (image placeholder included in ``user_text``)."""
    return f"{IM_START}user\n{user_text}{IM_END}{IM_START}assistant\n"


def prompt_grounded_report(language: str) -> str:
    if language == "zh":
        return f"{IMAGE_TOKEN}\n请定位并描述病灶。"
    return f"{IMAGE_TOKEN}\nPlease locate and describe the lesions."


def prompt_text_to_region(targets: Sequence[str], language: str) -> str:
    """Ask for one or more targets (labels in ``language``)."""
    if language == "zh":
        return f"{IMAGE_TOKEN}\n请定位" + "、".join(f"<ref>{t}</ref>" for t in targets) + "。"
    return f"{IMAGE_TOKEN}\nPlease locate " + ", ".join(f"<ref>{t}</ref>" for t in targets) + "."


def _sentence(lesion: Structure, kind: str, language: str) -> str:
    if language == "zh":
        where = f"{_SIDE_ZH[lesion.side]}肺" + (f"{_ZONE_ZH[lesion.zone]}野" if kind == "radiograph" else "")
        return f"{where}见{_SIZE_ZH[lesion.size]}{_ZH[lesion.label]}。"
    where = f"{lesion.side} {lesion.zone} zone" if kind == "radiograph" else f"{lesion.side} lung"
    return f"{lesion.size} {lesion.label} in the {where}."


def answer_grounded_report(phantom: Phantom, language: str) -> str:
    """The grounded report: one ``<ref>..</ref><box>..</box>: sentence`` per lesion, in reading order."""
    if not phantom.lesions:
        return "未见明确病灶。" if language == "zh" else "No focal lesion."
    colon = "：" if language == "zh" else ": "
    parts = []
    for lesion in phantom.lesions:
        box = relative_box(lesion.box, phantom.columns, phantom.rows)
        parts.append(f"<ref>{_label(lesion.label, language)}</ref>{_boxes([box])}{colon}"
                     f"{_sentence(lesion, phantom.kind, language)}")
    return ("" if language == "zh" else " ").join(parts)


def _one_region(phantom: Phantom, target_en: str, language: str) -> str:
    found = [s for s in (*phantom.lesions, *phantom.anatomy) if s.label == target_en]
    label = _label(target_en, language)
    if not found:
        return f"<ref>{label}</ref>：未见" if language == "zh" else f"<ref>{label}</ref>: none"
    boxes = [relative_box(s.box, phantom.columns, phantom.rows) for s in found]
    return f"<ref>{label}</ref>{_boxes(boxes)}"


def answer_text_to_region(phantom: Phantom, targets_en: Sequence[str], language: str) -> str:
    """Every instance of each target (English labels) as ``<ref>..</ref><box>[[..], ..]</box>``, in the order
    asked; a target that is absent is answered ``<ref>..</ref>: none``."""
    joiner = "，" if language == "zh" else ", "
    return joiner.join(_one_region(phantom, t, language) for t in targets_en)


def english_label(label: str) -> str:
    """The English label of a (possibly Chinese) label the model knows; the label itself otherwise."""
    return _EN.get(label.strip(), label.strip())


def all_texts() -> list[str]:
    """Every fixed text the model reads or writes, to build its vocabulary from."""
    texts = [chat_prompt(prompt_grounded_report(lang)) for lang in ("en", "zh")]
    texts += ["No focal lesion.", "未见明确病灶。", IM_END]
    texts += [chat_prompt(prompt_text_to_region(TARGETS_EN, "en")), "<ref>a</ref>: none, <ref>b</ref>: none."]
    texts += [chat_prompt(prompt_text_to_region(TARGETS_ZH, "zh")), "<ref>a</ref>：未见，<ref>b</ref>：未见。"]
    for label in LESIONS:
        for side in ("right", "left"):
            for size in ("small", "large"):
                for zone in ("upper", "middle", "lower"):
                    s = Structure(label, BoundingBox(0, 0, 1, 1), side, zone, size)
                    for language in ("en", "zh"):
                        texts += [_sentence(s, "radiograph", language), _sentence(s, "ct", language)]
    texts.append(_boxes([(0, 8, 16, 24), (32, 40, 48, 999)]) + ": ")
    return texts
