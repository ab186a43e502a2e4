"""The backend interface: load, warm up, generate for a batch, describe. Nothing more.

A backend runs a model; the adapter says how to build its inputs and read its outputs. The ``transformers``
backend calls the adapter's ``hf_*`` hooks; an optimised backend (TensorRT) will add its own hooks the same
way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from inference.adapters.base import ModelAdapter
from inference.config import ModelSettings
from inference.types import PreparedInput

__all__ = ["Backend"]


class Backend(ABC):
    """Executes one model for one worker process."""

    #: The registry key (``model.backend``).
    name: ClassVar[str] = ""

    def __init__(self, adapter: ModelAdapter, settings: ModelSettings, device: str) -> None:
        self.adapter = adapter
        self.settings = settings
        self.device = device

    @abstractmethod
    def load(self) -> None:
        """Load the weights from the adapter's checkpoint directory (local files only); raises
        ModelLoadError."""

    @abstractmethod
    def warm_up(self, item: PreparedInput) -> None:
        """Run one short generation on ``item`` so the first real job does not pay for lazy initialisation."""

    @abstractmethod
    def generate(self, batch: Sequence[PreparedInput]) -> list[str]:
        """One answer per item, greedy, each capped at the largest ``max_new_tokens`` of the batch."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What runs where (backend, device, dtype, attention), for logs and the algorithm identity."""
