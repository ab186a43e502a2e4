"""What the graph backends (onnxruntime, tensorrt) share: the checkpoint's export, and the greedy decode loop.

The transformers backend lets ``model.generate`` decode; these backends own the loop and the KV cache
(DESIGN: "the ONNX/TensorRT ones own the decode loop and KV buffers"). The loop repeats what transformers'
greedy search does, so that every runtime gives the same tokens for the same checkpoint and input (DESIGN
invariant 11): argmax of the last position's logits, the checkpoint's repetition penalty when its generation
configuration sets one, a finished row continues with the pad token until every row is finished or the longest
cap is reached.

A :class:`GraphRunner` runs the three graphs of an export on one runtime and keeps the KV cache in that runtime's
own arrays (on the GPU for CUDA), so only the logits and the new token ids cross to the host at each step.

The KV cache is preallocated once per batch: one buffer per layer for keys and one for values, as long as the
prompt plus every token the batch may generate. The decoder graph reads the buffers and returns the new tokens'
keys and values alone, which the runner writes into their slots; no step copies or grows the cache.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inference.adapters.base import HFHandle, ModelAdapter, checkpoint_fingerprint
from inference.backends.base import Backend, count_generated
from inference.config import ModelSettings
from inference.errors import InferenceError, ModelLoadError
from inference.export.manifest import ExportManifest, find_export
from inference.types import GraphInputs, PreparedInput

__all__ = ["GraphBackend", "GraphRunner", "TorchArrays", "greedy_generate", "prefill", "read_repetition_penalty"]

logger = logging.getLogger(__name__)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


class GraphRunner(ABC):
    """Runs the graphs of one export on one runtime; values stay in the runtime's own arrays between calls."""

    def __init__(self, folder: Path, manifest: ExportManifest) -> None:
        self.folder = folder
        self.manifest = manifest
        self.float_dtype = _NUMPY_DTYPES[manifest.dtype]

    @abstractmethod
    def run(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        """Run ``graph`` on ``feeds`` (host arrays or this runner's own); outputs in the manifest's order."""

    @abstractmethod
    def to_host(self, value: Any) -> np.ndarray:
        """A runner array as a host numpy array."""

    def cache_buffers(self, batch: int, capacity: int) -> dict[str, Any]:
        """Zeroed KV buffers of ``capacity`` slots for ``batch`` rows, by the decoder's input names."""
        layout = self.manifest.decoder
        shape = (batch, layout.kv_heads, capacity, layout.head_dim)
        return {name: np.zeros(shape, dtype=self.float_dtype) for name in layout.cache_names()}

    def write_cache(self, buffers: dict[str, Any], new: Sequence[Any], start: int) -> None:
        """Write the decoder's ``new_*`` outputs (``(batch, kv_heads, n, head_dim)``) into slots ``start..start+n``."""
        for name, value in zip(self.manifest.decoder.cache_names(), new, strict=True):
            value = self.to_host(value)
            buffers[name][:, :, start : start + value.shape[2]] = value

    def greedy_tokens(self, logits: Any) -> np.ndarray:
        """(batch,) the largest logit's token of each row (the first one on a tie, as numpy and torch both do)."""
        return self.to_host(logits).argmax(axis=-1)  # type: ignore[no-any-return]

    def describe(self) -> dict[str, str]:
        return {}


class TorchArrays:
    """KV buffers and values as torch tensors on one device, for the runners that keep them on a GPU."""

    torch: Any
    device: Any
    manifest: ExportManifest

    def _on_device(self, value: Any) -> Any:
        if isinstance(value, np.ndarray):
            value = self.torch.from_numpy(np.ascontiguousarray(value))
        return value.to(self.device, non_blocking=True).contiguous()

    def cache_buffers(self, batch: int, capacity: int) -> dict[str, Any]:
        layout = self.manifest.decoder
        dtype = self.torch.float16 if self.manifest.dtype == "float16" else self.torch.float32
        shape = (batch, layout.kv_heads, capacity, layout.head_dim)
        return {name: self.torch.zeros(shape, dtype=dtype, device=self.device) for name in layout.cache_names()}

    def write_cache(self, buffers: dict[str, Any], new: Sequence[Any], start: int) -> None:
        for name, value in zip(self.manifest.decoder.cache_names(), new, strict=True):
            value = self._on_device(value)
            buffers[name][:, :, start : start + value.shape[2]].copy_(value)

    def greedy_tokens(self, logits: Any) -> np.ndarray:
        """The argmax on the device: a step sends the host one id per row, not the rows' logits (on a GPU with
        Qwen's 152k-token vocabulary, 5 MB per step at batch 8)."""
        if isinstance(logits, np.ndarray):
            return logits.argmax(axis=-1)  # type: ignore[no-any-return]
        return logits.argmax(dim=-1).cpu().numpy()  # type: ignore[no-any-return]

    def to_host(self, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        value = value.detach()
        if value.dtype == self.torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        return value.cpu().numpy()  # type: ignore[no-any-return]


def read_repetition_penalty(directory: Path) -> float:
    """The checkpoint's ``generation_config.json`` repetition penalty (1.0: none), as transformers applies it."""
    import json

    try:
        data = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
        return float(data.get("repetition_penalty") or 1.0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1.0


def _penalise(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty: a seen token's logit divided by ``penalty`` (multiplied when negative)."""
    rows = np.arange(logits.shape[0])[:, None]
    chosen = logits[rows, seen]
    logits = logits.copy()
    logits[rows, seen] = np.where(chosen < 0, chosen * penalty, chosen / penalty)
    return logits


def _graph_floats(runner: GraphRunner, feeds: dict[str, Any]) -> dict[str, Any]:
    """Host float arrays in the export's precision (adapters build float32 pixel values; a float16 export takes
    float16); other values as they are."""
    return {name: value.astype(runner.float_dtype, copy=False)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" else value
            for name, value in feeds.items()}


def prefill(runner: GraphRunner, inputs: GraphInputs) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Run the vision, embed and decoder graphs on a batch's prompts: the decoder's outputs (the last position's
    logits, the KV cache) and the empty versions of the vision graph's further outputs, for the decode steps."""
    manifest = runner.manifest
    layout = manifest.decoder
    ids = inputs.input_ids.astype(np.int64)
    batch = ids.shape[0]
    embeds = runner.to_host(runner.run("embed", {"input_ids": ids})[0]).astype(runner.float_dtype, copy=True)
    image_rows = ids == manifest.image_token_id
    vision_extras: dict[str, np.ndarray] = {}
    if inputs.vision_feeds:
        vision = [[runner.to_host(v) for v in runner.run("vision", _graph_floats(runner, feeds))]
                  for feeds in inputs.vision_feeds]
        rows = np.concatenate([out[0].reshape(-1, layout.hidden_size) for out in vision])
        if rows.shape[0] != int(image_rows.sum()):
            raise InferenceError(
                f"the vision graph gave {rows.shape[0]} image features for {int(image_rows.sum())} image tokens"
            )
        embeds[image_rows] = rows.astype(runner.float_dtype)
        # Further vision outputs (Qwen3-VL's deepstack features): one row per image token, to the prefill by name;
        # the decode steps, which hold no image token, get them with no rows.
        for index, name in enumerate(manifest.graphs["vision"].outputs[1:], start=1):
            vision_extras[name] = np.concatenate([out[index] for out in vision])
    vision_empty = {name: np.zeros((0, *value.shape[1:]), dtype=value.dtype) for name, value in vision_extras.items()}
    feeds: dict[str, Any] = {
        "inputs_embeds": embeds,
        "attention_mask": inputs.attention_mask.astype(np.int64),
        "position_ids": inputs.position_ids.astype(np.int64),
        "cache_position": np.arange(ids.shape[1], dtype=np.int64),
        "cache_filled": np.zeros((batch, 0), dtype=np.int64),
        **runner.cache_buffers(batch, 0),  # nothing before the prompt: the prefill reads no buffer
        **_graph_floats(runner, {**inputs.prefill_extras, **vision_extras}),
    }
    return runner.run("decoder", feeds), vision_empty


def greedy_generate(
    runner: GraphRunner, inputs: GraphInputs, max_new_tokens: int, repetition_penalty: float = 1.0
) -> tuple[np.ndarray, dict[str, float]]:
    """Generated token ids ``(batch, steps)`` (pad after a row's end token) and timings in seconds."""
    manifest = runner.manifest
    layout = manifest.decoder
    started = time.perf_counter()
    ids = inputs.input_ids.astype(np.int64)
    batch, prompt = ids.shape
    outputs, vision_empty = prefill(runner, inputs)
    # The prompt's keys and values, then one slot per generated token the decoder will read (not the last one).
    capacity = prompt + max(0, max_new_tokens - 1)
    buffers = runner.cache_buffers(batch, capacity)
    runner.write_cache(buffers, outputs[1:], 0)
    filled = np.zeros((batch, capacity), dtype=np.int64)
    filled[:, :prompt] = inputs.attention_mask
    prefill_seconds = time.perf_counter() - started
    next_positions = inputs.next_positions().astype(np.int64)
    eos = np.array(manifest.eos_token_ids, dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    history = ids  # every token so far: only the repetition penalty reads it
    new_mask = np.ones((batch, 1), dtype=np.int64)
    generated: list[np.ndarray] = []
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:  # the penalty reads the logits of the tokens seen: on the host
            logits = _penalise(runner.to_host(outputs[0]).astype(np.float32), history, repetition_penalty)
            best = logits.argmax(axis=-1)
        else:
            best = runner.greedy_tokens(outputs[0])
        token = np.where(finished, manifest.pad_token_id, best).astype(np.int64)
        generated.append(token)
        finished |= np.isin(token, eos)
        if finished.all() or step == max_new_tokens - 1:
            break
        if repetition_penalty != 1.0:
            history = np.concatenate([history, token[:, None]], axis=1)
        slot = prompt + step
        filled[:, slot] = 1
        positions = (next_positions + step)[:, None]
        if layout.position_rows > 1:
            positions = np.broadcast_to(positions, (layout.position_rows, batch, 1)).copy()
        step_embeds = runner.run("embed", {"input_ids": token[:, None]})[0]
        feeds = {
            "inputs_embeds": step_embeds,
            "attention_mask": new_mask,
            "position_ids": positions,
            "cache_position": np.array([slot], dtype=np.int64),
            "cache_filled": filled,
            **buffers,
            **inputs.decode_extras,
            **vision_empty,
        }
        outputs = runner.run("decoder", feeds)
        runner.write_cache(buffers, outputs[1:], slot)
    tokens = np.stack(generated, axis=1) if generated else np.zeros((batch, 0), dtype=np.int64)
    total = time.perf_counter() - started
    return tokens, {"prefill_s": prefill_seconds, "total_s": total, "steps": float(len(generated))}


class GraphBackend(Backend):
    """A backend that runs the checkpoint's ONNX export through a :class:`GraphRunner`."""

    def __init__(self, adapter: ModelAdapter, settings: ModelSettings, device: str) -> None:
        super().__init__(adapter, settings, device)
        self.handle: HFHandle | None = None
        self.runner: GraphRunner | None = None
        self.manifest: ExportManifest | None = None
        self.repetition_penalty = 1.0
        self.last_timings: dict[str, float] = {}

    @abstractmethod
    def open_runner(self, folder: Path, manifest: ExportManifest) -> GraphRunner:
        """The runner of this runtime for an export folder; :class:`ModelLoadError` when it cannot run here."""

    def check_runtime(self) -> None:
        """Raise :class:`ModelLoadError` (one line: what is missing, how a site installs it) before any file is read."""

    def load(self) -> None:
        from inference.backends.hf import set_offline

        set_offline()
        self.adapter.check_exportable()
        self.check_runtime()
        directory = self.adapter.check_checkpoint()
        if self.settings.export_dir is None:
            raise ModelLoadError(
                f"model.backend {self.name!r} runs the checkpoint's ONNX export: set model.export_dir (the node "
                "sets it to <node.data_dir>/model-exports)"
            )
        started = time.perf_counter()
        fingerprint = checkpoint_fingerprint(directory)
        folder, manifest = find_export(self.settings.export_dir, self.adapter.family, directory, fingerprint)
        try:
            self.handle = self.adapter.hf_load_preprocessing(directory)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the tokenizer and image processor of {str(directory)!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.runner = self.open_runner(folder, manifest)
        self.manifest = manifest
        self.repetition_penalty = read_repetition_penalty(directory)
        logger.info(
            "loaded the %s export %s on %s (%s) in %.1f s",
            self.adapter.family,
            folder.name,
            self.device,
            self.name,
            time.perf_counter() - started,
        )

    def _require(self) -> tuple[HFHandle, GraphRunner]:
        if self.handle is None or self.runner is None:
            raise InferenceError(f"{type(self).__name__}.generate called before load()")
        return self.handle, self.runner

    def warm_up(self, item: PreparedInput) -> None:
        from dataclasses import replace

        self.generate([replace(item, max_new_tokens=2)])

    def encode(self, batch: Sequence[PreparedInput]) -> GraphInputs:
        handle, _ = self._require()
        return self.adapter.export_encode(handle, batch)

    def generate_tokens(self, batch: Sequence[PreparedInput]) -> np.ndarray:
        """The generated token ids of a batch (tests compare them with the transformers backend's)."""
        _, runner = self._require()
        inputs = self.encode(batch)
        max_new_tokens = max(item.max_new_tokens for item in batch)
        tokens, self.last_timings = greedy_generate(runner, inputs, max_new_tokens, self.repetition_penalty)
        assert self.manifest is not None
        self.last_stats = {
            "tokens": float(count_generated(tokens, self.manifest.eos_token_ids)),
            "ttft_s": self.last_timings["prefill_s"],
        }
        return tokens

    def generate(self, batch: Sequence[PreparedInput]) -> list[str]:
        if not batch:
            return []
        handle, _ = self._require()
        tokens = self.generate_tokens(batch)
        texts = handle.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        if len(texts) != len(batch):
            raise InferenceError(f"backend returned {len(texts)} answers for a batch of {len(batch)}")
        return [t.strip() for t in texts]

    def describe(self) -> dict[str, str]:
        described = {
            "backend": self.name,
            "device": self.device,
            "dtype": self.manifest.dtype if self.manifest else "float32",
            "decoding": "greedy",
        }
        if self.runner is not None:
            described.update(self.runner.describe())
        return described

