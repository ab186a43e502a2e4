"""Plain data passed between the steps of inference: pre-process, predict, post-process.

Standard library and numpy only, so that the node, the adapters and the tests can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from inference.geometry import ImageTransform
from sr_writer.findings import BoundingBox, Finding, ImageRef, Language

__all__ = [
    "IMAGE_PLACEHOLDER",
    "GraphInputs",
    "ModelImage",
    "ParsedAnswer",
    "PreparedInput",
    "Profile",
    "Prompt",
    "RegionInput",
    "TaskRequest",
]

#: Marks where the image goes in :attr:`Prompt.text`; adapters replace it by their own image tokens.
IMAGE_PLACEHOLDER = "<image>"


class Profile(StrEnum):
    """A task profile: what the model is asked to do."""

    GROUNDED_REPORT = "grounded_report"
    TEXT_TO_REGION = "text_to_region"
    REGION_TO_TEXT = "region_to_text"
    VQA = "vqa"


@dataclass(frozen=True)
class ModelImage:
    """One display-ready image taken from a DICOM object, before any model-specific geometry.

    ``pixels`` is uint8 RGB of shape (rows, columns, 3), at source resolution, grey-scale images replicated on
    the three channels, after Modality LUT, VOI LUT/window and MONOCHROME1 inversion.
    """

    pixels: np.ndarray
    ref: ImageRef
    modality: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    window: str = ""  # which window was applied ("header", "lung", "full_range", "colour", ...)
    body_part: str = ""

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.uint8 or self.pixels.ndim != 3 or self.pixels.shape[2] != 3:
            raise ValueError(
                f"ModelImage.pixels must be uint8 (rows, columns, 3), got {self.pixels.dtype} {self.pixels.shape}"
            )

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])


@dataclass(frozen=True)
class RegionInput:
    """A region a radiologist marked (from a GSPS or SR, or given by the caller), in source pixel space."""

    box: BoundingBox
    ref: ImageRef | None = None  # None: the first selected image


@dataclass(frozen=True)
class TaskRequest:
    """What to ask: the profile, its language and its arguments."""

    profile: Profile
    language: Language = Language.ENGLISH
    targets: tuple[str, ...] = ()  # text_to_region (and grounded_report: organs to describe)
    region: RegionInput | None = None  # region_to_text
    question: str = ""  # vqa
    modality: str = ""  # of the image asked about; ModelAdapter.prepare fills it in per image

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", Profile(self.profile))
        object.__setattr__(self, "language", Language(self.language))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.profile is Profile.REGION_TO_TEXT and self.region is None:
            raise ValueError("TaskRequest.region is required for profile 'region_to_text', got None")
        if self.profile is Profile.VQA and not self.question.strip():
            raise ValueError("TaskRequest.question is required for profile 'vqa', got an empty question")


@dataclass(frozen=True)
class Prompt:
    """A single-turn prompt: optional system message and the user text with one :data:`IMAGE_PLACEHOLDER`."""

    text: str
    system: str | None = None

    def split_at_image(self) -> tuple[str, str]:
        """The user text before and after the image placeholder (leading newline after it removed)."""
        before, _, after = self.text.partition(IMAGE_PLACEHOLDER)
        return before, after.removeprefix("\n")


@dataclass(frozen=True)
class PreparedInput:
    """One image made ready for a model: its pixels in model geometry, the transform back, and the prompt."""

    image: ModelImage
    request: TaskRequest
    pixels: np.ndarray  # uint8 (rows, columns, 3) as the processor receives it
    transform: ImageTransform  # source image -> ``pixels``
    prompt: Prompt
    max_new_tokens: int
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParsedAnswer:
    """What an adapter read from one answer: findings in source pixel space and the narrative text."""

    findings: tuple[Finding, ...] = ()
    narrative: str = ""
    problems: tuple[str, ...] = ()  # why boxes were dropped or findings made text-only (no patient data)


@dataclass
class GraphInputs:
    """A batch encoded for the graph backends (onnxruntime, tensorrt): host arrays, prompts left-padded.

    The backend runs the ``vision`` graph once per entry of :attr:`vision_feeds` (rows of the outputs concatenated
    in order, one row per image token), writes those rows over the embeddings of the image tokens, then runs the
    decoder: the prefill with :attr:`prefill_extras`, each decode step with :attr:`decode_extras`. Further outputs
    of the vision graph (one row per image token, e.g. Qwen3-VL's deepstack features) are concatenated the same
    way and given to the prefill under their output names, and to each decode step with no rows.
    """

    input_ids: np.ndarray  # (batch, seq) int64
    attention_mask: np.ndarray  # (batch, seq) int64, 0 on the left padding
    position_ids: np.ndarray  # (batch, seq), or (3, batch, seq) for M-RoPE; int64
    vision_feeds: list[dict[str, np.ndarray]]
    prefill_extras: dict[str, np.ndarray] = field(default_factory=dict)
    decode_extras: dict[str, np.ndarray] = field(default_factory=dict)  # batch axis first, one position

    def next_positions(self) -> np.ndarray:
        """(batch,) the position of each row's first generated token: one past the row's largest position."""
        positions = self.position_ids if self.position_ids.ndim == 3 else self.position_ids[None]
        return positions.max(axis=(0, 2)) + 1
