"""Lenient parsers of model answers, shared by the adapters.

Two published answer formats cover the supported families:

* ref/box tags (MedRegA, InternVL, and the demo model): ``<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>``,
  several labels joined by ``, ``, a description after ``:`` or the full-width ``：``;
* JSON lists (Qwen2.5-VL, Qwen3-VL, MedGemma): ``[{"bbox_2d": [...], "label": "..."}]``, often inside a
  ```` ```json ```` fence, possibly truncated.

:func:`parse_ref_boxes` and :func:`parse_json_boxes` read the model's numbers as written (no coordinate system
yet); :class:`BoxSpace` says what the numbers mean for one family and :func:`regions_to_findings` turns them
into findings in source pixel space. Nothing here raises on model text: what cannot be read becomes a text-only
finding or is dropped, and the reason is logged and returned.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from inference.geometry import ImageTransform
from inference.types import ParsedAnswer, PreparedInput, Profile
from sr_writer.findings import BoundingBox, Finding, ImageRef, Language

__all__ = [
    "BoxSpace",
    "ParsedRegions",
    "RawRegion",
    "build_answer",
    "format_ref_box",
    "parse_json_boxes",
    "parse_ref_box_answer",
    "parse_ref_boxes",
    "regions_to_findings",
]

logger = logging.getLogger(__name__)

RawBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class RawRegion:
    """A label with the boxes the model wrote for it (x0, y0, x1, y1 in the model's own numbers) and its text."""

    label: str
    boxes: tuple[RawBox, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class ParsedRegions:
    """The regions of one answer, the answer as readable narrative, and what could not be read."""

    regions: tuple[RawRegion, ...] = ()
    narrative: str = ""
    problems: tuple[str, ...] = ()


# -------------------------------------------------------------------------------------------------------
# ref/box tags
# -------------------------------------------------------------------------------------------------------
_TAG = re.compile(
    r"<ref>(?P<label>.*?)</ref>\s*(?:<box>(?P<box>.*?)(?:</box>|$))?|<box>(?P<lone>.*?)(?:</box>|$)",
    re.DOTALL,
)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_QUAD = re.compile(rf"[\[(]\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[\])]")
_PAIRS = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")
_SEPARATORS = " \t\r\n,，;；:：、"
_LEADING = re.compile(r"^[\s,，;；]*[:：]?\s*")


def _boxes_in(body: str, problems: list[str]) -> tuple[RawBox, ...]:
    """The 4-number groups in a ``<box>`` body; an incomplete trailing group is reported, not returned."""
    boxes = [tuple(float(v) for v in m.groups()) for m in _QUAD.finditer(body)]
    if not boxes:
        boxes = [tuple(float(v) for v in m.groups()) for m in _PAIRS.finditer(body)]
    numbers = re.findall(_NUMBER, body)
    if len(numbers) > 4 * len(boxes):
        problems.append(f"incomplete box dropped ({len(numbers) - 4 * len(boxes)} stray numbers)")
    return tuple(boxes)  # type: ignore[arg-type]


def parse_ref_boxes(text: str) -> ParsedRegions:
    """Read ``<ref>label</ref><box>[[x1, y1, x2, y2], ...]</box>`` answers (MedRegA, InternVL, demo).

    Labels listed one after another (``<ref>a</ref><box>..</box>, <ref>b</ref><box>..</box>: text``) share the
    text that follows them; a box without a label gets the label ``""`` (the adapter names it); a truncated tag
    is read as far as it goes. Never raises.
    """
    if not isinstance(text, str):
        return ParsedRegions(problems=(f"answer is not text ({type(text).__name__})",))
    problems: list[str] = []
    groups: list[list[tuple[str, tuple[RawBox, ...]]]] = []  # clusters of (label, boxes) sharing one text
    texts: list[str] = []
    narrative: list[str] = []
    cursor = 0
    pending: list[tuple[str, tuple[RawBox, ...]]] = []
    for match in _TAG.finditer(text):
        between = text[cursor : match.start()]
        if pending and between.strip(_SEPARATORS):
            groups.append(pending)
            texts.append(_LEADING.sub("", between).strip())
            pending = []
        elif not pending and between.strip():
            narrative.append(between.strip())
        label = match.group("label")
        body = match.group("box") if label is not None else match.group("lone")
        label = (label or "").strip()
        boxes = _boxes_in(body, problems) if body is not None else ()
        if body is not None and not match.group(0).rstrip().endswith("</box>"):
            problems.append(f"unterminated <box> for {label or 'unlabelled box'!r}")
        pending.append((label, boxes))
        cursor = match.end()
    tail = text[cursor:]
    # An unterminated <ref> at the very end: its label is unreliable, keep it out of the findings.
    if "<ref>" in tail:
        cut = tail.index("<ref>")
        problems.append("unterminated <ref> dropped")
        tail = tail[:cut]
    if pending:
        groups.append(pending)
        texts.append(_LEADING.sub("", tail).strip())
    elif tail.strip():
        narrative.append(tail.strip())

    regions: list[RawRegion] = []
    for cluster, shared in zip(groups, texts, strict=True):
        for label, boxes in cluster:
            regions.append(RawRegion(label=label, boxes=boxes, text=shared))
    readable = re.sub(r"<box>.*?(?:</box>|$)", "", text, flags=re.DOTALL)
    readable = re.sub(r"</?ref>", "", readable)
    readable = re.sub(r"<ref>.*$", "", readable, flags=re.DOTALL)
    readable = re.sub(r"[ \t]+", " ", readable).strip()
    for problem in problems:
        logger.info("model answer: %s", problem)
    return ParsedRegions(tuple(regions), readable, tuple(problems))


def format_ref_box(label: str, box: Sequence[float]) -> str:
    """``<ref>label</ref><box>[[x1, y1, x2, y2]]</box>`` with integer coordinates (a region in a prompt)."""
    numbers = ", ".join(str(round(v)) for v in box)
    return f"<ref>{label}</ref><box>[[{numbers}]]</box>"


# -------------------------------------------------------------------------------------------------------
# JSON lists
# -------------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL)
_OBJECT = re.compile(r"\{[^{}]*\}")


def _json_candidates(text: str) -> tuple[Any, str, str]:
    """(decoded JSON or None, the JSON text, the text around it)."""
    fence = _FENCE.search(text)
    if fence:
        body, outside = fence.group(1), text[: fence.start()] + " " + text[fence.end() :]
    else:
        starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
        if not starts:
            return None, "", text
        start = min(starts)
        body, outside = text[start:], text[:start]
    body = body.strip()
    try:
        decoded, end = json.JSONDecoder().raw_decode(body)
        return decoded, body[:end], outside + " " + body[end:]
    except ValueError:
        return None, body, outside


def parse_json_boxes(text: str, key: str = "bbox_2d", order: Literal["xyxy", "yxyx"] = "xyxy") -> ParsedRegions:
    """Read ``[{"<key>": [..4 numbers..], "label": "..."}]`` answers (Qwen2.5-VL, Qwen3-VL, MedGemma).

    ``order="yxyx"`` reads MedGemma's ``box_2d`` ([y0, x0, y1, x1]); boxes come back as (x0, y0, x1, y1).
    Truncated JSON is read object by object. Objects with the same label keep their order. Never raises.
    """
    if not isinstance(text, str):
        return ParsedRegions(problems=(f"answer is not text ({type(text).__name__})",))
    problems: list[str] = []
    decoded, body, outside = _json_candidates(text)
    items: list[Any]
    if isinstance(decoded, list):
        items = decoded
    elif isinstance(decoded, dict):
        items = [decoded]
    else:
        items = []
        for match in _OBJECT.finditer(body):
            try:
                items.append(json.loads(match.group(0)))
            except ValueError:
                problems.append("unreadable JSON object dropped")
        if body and decoded is None:
            problems.append("answer JSON is malformed or truncated; read object by object")
    regions: list[RawRegion] = []
    for item in items:
        if not isinstance(item, dict):
            problems.append(f"JSON item is not an object ({type(item).__name__}), dropped")
            continue
        label = item.get("label", "")
        label = label.strip() if isinstance(label, str) else str(label)
        extra = item.get("description", item.get("text", ""))
        extra = extra if isinstance(extra, str) else ""
        raw = item.get(key)
        box: RawBox | None = None
        if (
            isinstance(raw, list)
            and len(raw) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)
        ):
            a, b, c, d = (float(v) for v in raw)
            box = (b, a, d, c) if order == "yxyx" else (a, b, c, d)
        elif raw is not None:
            problems.append(f"malformed {key} for {label or 'unlabelled item'!r}: {str(raw)[:40]}")
        if box is None and not label:
            continue
        regions.append(RawRegion(label=label, boxes=(box,) if box else (), text=extra.strip()))
    if body and not items and not regions and decoded is None:
        problems.append("no JSON object found in answer")
    narrative = re.sub(r"\s+", " ", outside).strip()
    if narrative.lower().startswith("final answer:"):
        narrative = narrative[len("final answer:") :].strip()
    for problem in problems:
        logger.info("model answer: %s", problem)
    return ParsedRegions(tuple(regions), narrative, tuple(problems))


# -------------------------------------------------------------------------------------------------------
# Model numbers -> source pixel space
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoxSpace:
    """What a family's box numbers mean.

    ``scale``: the numbers are relative to the model-input image on 0..``scale`` (MedRegA 999, InternVL3, Qwen3-VL
    and MedGemma 1000): pixel edge = value / scale x size. ``None``: absolute pixels of the model-input image
    (Qwen2.5-VL). ``tolerance``: how far outside the range (fraction of it) a value may be before the box is
    dropped; values within it are clipped.
    """

    scale: float | None = None
    tolerance: float = 0.02

    def to_model(self, raw: RawBox, size: tuple[int, int]) -> BoundingBox | str:
        """The box in model-input pixel edges, or the reason it is unusable."""
        columns, rows = size
        if not all(math.isfinite(v) for v in raw):
            return f"non-finite box {raw}"
        limits = (columns, rows) if self.scale is None else (self.scale, self.scale)
        values = list(raw)
        for i, v in enumerate(values):
            limit = limits[i % 2]
            if v < -self.tolerance * limit or v > limit * (1 + self.tolerance):
                return f"box {raw} out of range 0..{limit:g}"
            values[i] = min(max(v, 0.0), limit)
        x0, y0, x1, y1 = values
        if x0 > x1:
            x0, x1 = x1, x0
        if y0 > y1:
            y0, y1 = y1, y0
        if x1 <= x0 or y1 <= y0:
            return f"box {raw} has no area"
        if self.scale is not None:
            x0, x1 = x0 / self.scale * columns, x1 / self.scale * columns
            y0, y1 = y0 / self.scale * rows, y1 / self.scale * rows
        return BoundingBox(x0, y0, x1, y1)

    def from_source(self, box: BoundingBox, transform: ImageTransform) -> tuple[float, float, float, float]:
        """A source-space box in this family's numbers (for prompts that carry a region); integers when scaled."""
        model = transform.box_to_model(box)
        columns, rows = transform.output_size
        if self.scale is None:
            return (round(model.x0), round(model.y0), round(model.x1), round(model.y1))
        s = self.scale

        def q(v: float, size: int) -> float:
            return float(min(max(round(v / size * s), 0), s))

        return (q(model.x0, columns), q(model.y0, rows), q(model.x1, columns), q(model.y1, rows))


@dataclass
class _Collector:
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def regions_to_findings(
    parsed: ParsedRegions,
    space: BoxSpace,
    transform: ImageTransform,
    ref: ImageRef,
    language: Language | str = Language.ENGLISH,
    default_label: str = "region",
    fallback_labels: Sequence[str] = (),
) -> tuple[list[Finding], list[str]]:
    """Findings in source pixel space from parsed regions; returns (findings, problems).

    One finding per box (several boxes for one label give several findings with that label); a label without a
    usable box gives a text-only finding; a box without a label takes the next of ``fallback_labels`` (the
    requested targets), else ``default_label``.
    """
    out = _Collector(problems=list(parsed.problems))
    lang = Language(language)
    fallback = list(fallback_labels)
    for region in parsed.regions:
        label = region.label or (fallback.pop(0) if fallback else default_label)
        placed = 0
        for raw in region.boxes:
            model_box = space.to_model(raw, transform.output_size)
            if isinstance(model_box, str):
                out.problems.append(f"{label!r}: {model_box}; dropped")
                logger.info("model answer: box of %r dropped: %s", label, model_box)
                continue
            source_box = transform.box_to_source(model_box)
            if source_box is None:
                out.problems.append(f"{label!r}: box {raw} lies in the padding; dropped")
                logger.info("model answer: box of %r lies outside the image, dropped", label)
                continue
            out.findings.append(Finding(label=label, text=region.text, box=source_box, source=ref, language=lang))
            placed += 1
        if placed == 0:
            if region.boxes:
                out.problems.append(f"{label!r}: no usable box; kept as text-only finding")
            out.findings.append(Finding(label=label, text=region.text, language=lang))
    return out.findings, out.problems


def build_answer(
    parsed: ParsedRegions,
    space: BoxSpace,
    item: PreparedInput,
    raw_text: str,
) -> ParsedAnswer:
    """The :class:`ParsedAnswer` of one item, by profile.

    ``region_to_text``: one finding on the asked region, labelled with the answer; ``vqa``: the answer as
    narrative, no findings; ``grounded_report`` and ``text_to_region``: the parsed regions as findings (requested
    targets name unlabelled boxes).
    """
    request = item.request
    language = request.language
    text = raw_text.strip() if isinstance(raw_text, str) else ""
    if request.profile is Profile.VQA:
        return ParsedAnswer(narrative=parsed.narrative or text, problems=parsed.problems)
    if request.profile is Profile.REGION_TO_TEXT:
        region = request.region
        answer = re.sub(r"\s+", " ", parsed.narrative or text).strip().rstrip("。.")
        if region is None or not answer:
            return ParsedAnswer(narrative=answer, problems=(*parsed.problems, "empty answer for the region"))
        label = answer if len(answer) <= 64 else answer[:61].rstrip() + "..."
        box = region.box.clipped(item.image.columns, item.image.rows)
        if box is None:
            return ParsedAnswer(narrative=answer, problems=(*parsed.problems, "asked region lies outside the image"))
        finding = Finding(label=label, text=answer, box=box, source=item.image.ref, language=language)
        return ParsedAnswer(findings=(finding,), narrative=answer, problems=parsed.problems)
    findings, problems = regions_to_findings(
        parsed, space, item.transform, item.image.ref, language, fallback_labels=request.targets
    )
    return ParsedAnswer(findings=tuple(findings), narrative=parsed.narrative, problems=tuple(problems))


#: ChatML's end of turn (MedRegA's Hermes-2 template, InternVL's): an answer ends there when the decoder kept it.
_END_OF_TURN = "<|im_end|>"


def parse_ref_box_answer(text: str, item: PreparedInput, space: BoxSpace) -> ParsedAnswer:
    """The :class:`ParsedAnswer` of a ``<ref>/<box>`` answer, its boxes in ``space``; never raises.

    The answer is read up to the first ``<|im_end|>``, then as :func:`parse_ref_boxes` and :func:`build_answer`.
    """
    if not isinstance(text, str):
        text = ""
    text = text.split(_END_OF_TURN, 1)[0]
    return build_answer(parse_ref_boxes(text), space, item, text)
