"""The ``transformers`` backend: CPU or CUDA, bf16 on GPU, SDPA attention, greedy decoding, batched generate."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from inference.adapters.base import HFHandle, ModelAdapter
from inference.backends.base import Backend, count_generated
from inference.config import ModelSettings
from inference.errors import InferenceError, ModelLoadError
from inference.types import PreparedInput

__all__ = ["TransformersBackend", "resolve_dtype", "set_offline"]

logger = logging.getLogger(__name__)


def set_offline() -> None:
    """Forbid any hub access in this process: weights come from local directories only (DESIGN invariant 5)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def resolve_dtype(setting: str, device: str) -> Any:
    """The torch dtype for ``model.dtype``: ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


class _FirstToken:
    """A generation streamer that notes when the first new tokens arrive (the first call carries the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersBackend(Backend):
    """Runs a checkpoint with Hugging Face transformers, through the adapter's ``hf_*`` hooks."""

    name: ClassVar[str] = "transformers"

    def __init__(self, adapter: ModelAdapter, settings: ModelSettings, device: str) -> None:
        super().__init__(adapter, settings, device)
        self.handle: HFHandle | None = None
        self.dtype: Any = None

    def load(self) -> None:
        set_offline()
        directory = self.adapter.check_checkpoint()
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"model.device {self.device!r} asks for CUDA, but torch sees no CUDA device")
        self.dtype = resolve_dtype(self.settings.dtype, self.device)
        if self.device.startswith("cuda"):
            self._check_memory(directory)
        started = time.perf_counter()
        try:
            self.handle = self.adapter.hf_load(directory, self.device, self.dtype, self.attention)
        except ModelLoadError:
            raise
        except Exception as exc:
            # on a bad checkpoint; at worker start-up it all means one thing: this checkpoint cannot be served.
            expected = "; ".join(f"{r.what}: one of {', '.join(r.names)}" for r in self.adapter.required_files)
            raise ModelLoadError(
                f"cannot load the {self.adapter.family!r} checkpoint at {str(directory)!r} (expected {expected}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if self.settings.compile:
            self._compile()
        logger.info(
            "loaded %s checkpoint %s on %s (%s, %s attention%s) in %.1f s",
            self.adapter.family,
            directory.name,
            self.device,
            self.dtype,
            self.attention,
            ", static KV cache + torch.compile" if self.settings.compile else "",
            time.perf_counter() - started,
        )

    @property
    def attention(self) -> str:
        """``model.attn_implementation``, with ``auto`` resolved: flash attention where installed on CUDA, else SDPA."""
        setting = self.settings.attn_implementation
        if setting != "auto":
            return setting
        if self.device.startswith("cuda"):
            import importlib.util

            if importlib.util.find_spec("flash_attn") is not None:
                return "flash_attention_2"
        return "sdpa"

    def _check_memory(self, directory: Path) -> None:
        """Stop before loading when the weights cannot fit in the GPU's free memory (both figures in the message)."""
        import torch

        from inference.memory import check_fits, weight_bytes

        needed = weight_bytes(directory, torch.tensor([], dtype=self.dtype).element_size())
        if needed is None:
            return
        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        check_fits(needed, free, total, self.device, str(self.dtype).removeprefix("torch."))

    def _compile(self) -> None:
        """A static KV cache and ``torch.compile(mode="reduce-overhead")``: CUDA graphs for the decode steps."""
        import torch

        handle = self._require()
        handle.model.generation_config.cache_implementation = "static"
        handle.model.forward = torch.compile(handle.model.forward, mode="reduce-overhead", fullgraph=False)

    def _require(self) -> HFHandle:
        if self.handle is None:
            raise InferenceError("TransformersBackend.generate called before load()")
        return self.handle

    def warm_up(self, item: PreparedInput) -> None:
        from dataclasses import replace

        self.generate([replace(item, max_new_tokens=2)])

    def _sequences(self, batch: Sequence[PreparedInput]) -> tuple[Any, Mapping[str, Any]]:
        import torch

        handle = self._require()
        started = time.perf_counter()
        encoded = self.adapter.hf_encode(handle, batch, self.device)
        max_new_tokens = max(item.max_new_tokens for item in batch)
        kwargs = self.adapter.hf_generate_kwargs(handle)
        first_token = _FirstToken()
        with torch.inference_mode():
            sequences = handle.model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, streamer=first_token, **kwargs
            )
        generated = self.adapter.hf_new_tokens(sequences, encoded)
        self.last_stats = {
            "tokens": float(count_generated(generated.cpu().numpy(), self.adapter.hf_end_tokens(handle))),
            "ttft_s": (first_token.at or time.perf_counter()) - started,
        }
        return sequences, encoded

    def generate_tokens(self, batch: Sequence[PreparedInput]) -> Any:
        """The generated token ids of a batch as a numpy array (batch, steps), pad after a row's end token."""
        sequences, encoded = self._sequences(batch)
        return self.adapter.hf_new_tokens(sequences, encoded).cpu().numpy()

    def generate(self, batch: Sequence[PreparedInput]) -> list[str]:
        if not batch:
            return []
        handle = self._require()
        started = time.perf_counter()
        sequences, encoded = self._sequences(batch)
        texts = self.adapter.hf_decode(handle, sequences, encoded)
        logger.debug("generated %d answers in %.2f s", len(texts), time.perf_counter() - started)
        if len(texts) != len(batch):
            raise InferenceError(f"backend returned {len(texts)} answers for a batch of {len(batch)}")
        return texts

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else self.settings.dtype,
            "attention": self.attention,
            "decoding": "greedy",
        }
