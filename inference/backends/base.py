"""The backend interface: load, warm up, generate for a batch, describe. Nothing more.

A backend runs a model; the adapter says how to build its inputs and read its outputs. The ``transformers``
backend calls the adapter's ``hf_*`` hooks; the graph backends (``onnxruntime``, ``tensorrt``) run the
checkpoint's ONNX export through the adapter's ``export_*`` hooks (:mod:`inference.backends.graphs`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from inference.adapters.base import ModelAdapter
from inference.config import ModelSettings
from inference.types import PreparedInput

__all__ = ["Backend", "count_generated"]


def count_generated(tokens: Any, end_ids: Sequence[int]) -> int:
    """Generated tokens in a (batch, steps) array: each row up to and including its first end token."""
    import numpy as np

    array = np.asarray(tokens)
    if array.size == 0:
        return 0
    ended = np.isin(array, np.asarray(list(end_ids), dtype=array.dtype))
    first = np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, array.shape[1])
    return int(first.sum())


class Backend(ABC):
    """Executes one model for one worker process."""

    #: The registry key (``model.backend``).
    name: ClassVar[str] = ""

    def __init__(self, adapter: ModelAdapter, settings: ModelSettings, device: str) -> None:
        self.adapter = adapter
        self.settings = settings
        self.device = device
        #: Figures of the last generate call, for the worker's metrics: ``tokens`` (generated, up to each row's
        #: end token) and ``ttft_s`` (prefill and first token). Written by the thread that calls generate.
        self.last_stats: dict[str, float] = {}

    def check_runtime(self) -> None:  # noqa: B027 - a hook: most backends need nothing beyond their imports
        """Raise ModelLoadError, one line naming what is missing and how a site installs it, when this runtime
        cannot run on this host and device; cheap, reads no checkpoint file."""

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
    def generate_tokens(self, batch: Sequence[PreparedInput]) -> Any:
        """The generated token ids of a batch, a numpy array (batch, steps) with pad after a row's end token:
        what the backends' agreement (DESIGN invariant 11) is checked on."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What runs where (backend, device, dtype, attention), for logs and the algorithm identity."""
