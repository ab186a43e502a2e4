"""The ``tensorrt`` backend: the checkpoint's ONNX export as NVIDIA TensorRT engines on one CUDA GPU.

TensorRT is never installed by the node: a site installs it (NVIDIA's container, or ``pip install tensorrt-cu12``
from NVIDIA's package index) and the backend imports it when a worker loads its model. Where the module or a CUDA
device is missing, the worker stops at start-up with one line saying what is missing and how to get it.

Engines are built from the export's graphs the first time a worker starts on a kind of GPU (minutes for a real
checkpoint) and kept beside the export, under
``tensorrt/<TensorRT version>-cuda<CUDA version>-sm<capability>-b<batch>-s<tokens>/``;
every later start loads them in seconds. Buffers are torch CUDA tensors: the KV cache is preallocated on the GPU
for each batch and each decode step writes only the new token's keys and values into it.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from inference.backends.graphs import GraphBackend, GraphRunner, TorchArrays
from inference.errors import ModelLoadError
from inference.export.manifest import ExportManifest
from inference.export.tensorrt_build import DimRanges, build_engine

__all__ = ["INSTALL_HINT", "TensorRTBackend", "TensorRTRunner", "import_tensorrt"]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "a site installs NVIDIA TensorRT 10 or later itself (NVIDIA's TensorRT container, or `pip install tensorrt-cu12 "
    "--extra-index-url https://pypi.nvidia.com` on a host with the NVIDIA driver); or set model.backend: onnxruntime"
)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module; :class:`ModelLoadError` saying how a site installs it when it is missing."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise ModelLoadError(
            f"model.backend 'tensorrt' needs the NVIDIA TensorRT Python module `tensorrt`, which cannot be imported "
            f"here ({exc}): {INSTALL_HINT}"
        ) from None
    except OSError as exc:  # the module is there, a shared library (libnvinfer, CUDA) is not
        raise ModelLoadError(
            f"model.backend 'tensorrt': the TensorRT libraries cannot be loaded ({exc}): {INSTALL_HINT}"
        ) from None


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TensorRTRunner(TorchArrays, GraphRunner):
    """One TensorRT engine and execution context per graph, on one CUDA device."""

    def __init__(self, folder: Path, manifest: ExportManifest, device: str, max_batch: int, max_sequence: int) -> None:
        super().__init__(folder, manifest)
        import torch

        self.trt = import_tensorrt()
        self.torch = torch
        self.device = torch.device(device if ":" in device else "cuda:0")
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        capability = "".join(str(v) for v in torch.cuda.get_device_capability(self.device))
        # The export folder is one checkpoint version; the tag adds what an engine is only valid for: the TensorRT
        # and CUDA versions, the GPU's compute capability, and the profile (batch and sequence bounds).
        tag = f"{self.trt.__version__}-cuda{torch.version.cuda}-sm{capability}-b{max_batch}-s{max_sequence}"
        engine_dir = folder / "tensorrt" / tag
        engine_dir.mkdir(parents=True, exist_ok=True)
        ranges = DimRanges.for_generation(max_batch, max_sequence, manifest.dim_ranges)
        log = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(log)
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        for name, graph in manifest.graphs.items():
            path = engine_dir / f"{name}.engine"
            if not path.is_file():
                started = time.perf_counter()
                logger.info("building the TensorRT engine of graph %s for %s (once per GPU kind)", name, tag)
                data = build_engine(self.trt, folder / graph.file, ranges, fp16=manifest.dtype == "float16")
                partial = path.with_suffix(".partial")
                partial.write_bytes(data)
                os.replace(partial, path)
                logger.info("built %s in %.0f s", path, time.perf_counter() - started)
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ModelLoadError(
                    f"TensorRT cannot load the engine {str(path)!r} (built by another TensorRT version?): remove "
                    f"{str(engine_dir)!r} and start the worker again to rebuild it"
                )
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.tag = tag
        self._dummy = torch.empty(1, device=self.device)

    def run(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        torch = self.torch
        engine, context = self.engines[graph], self.contexts[graph]
        held = []
        for name, value in feeds.items():
            tensor = self._on_device(value)
            wanted = _torch_dtype(self.trt, engine.get_tensor_dtype(name))
            if tensor.dtype != wanted:
                tensor = tensor.to(wanted)
            held.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr())
        outputs = []
        for name in self.manifest.graphs[graph].outputs:
            shape = tuple(context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=_torch_dtype(self.trt, engine.get_tensor_dtype(name)), device=self.device)
            outputs.append(tensor)
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise ModelLoadError(f"TensorRT failed to run graph {graph!r}")
        self.stream.synchronize()
        return outputs

    def describe(self) -> dict[str, str]:
        return {"engines": self.tag}


class TensorRTBackend(GraphBackend):
    """Runs the checkpoint's ONNX export as TensorRT engines on one CUDA GPU."""

    name: ClassVar[str] = "tensorrt"

    def check_runtime(self) -> None:
        import_tensorrt()
        if not self.device.startswith("cuda"):
            raise ModelLoadError(
                f"model.backend 'tensorrt' runs on an NVIDIA GPU, but model.device is {self.device!r}: set "
                "model.device: cuda (or cuda:N), or use model.backend: onnxruntime on the CPU"
            )
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError(
                "model.backend 'tensorrt' needs a CUDA device, and torch sees none (no NVIDIA GPU, driver or CUDA "
                "build of torch on this host); or use model.backend: onnxruntime"
            )

    def open_runner(self, folder: Path, manifest: ExportManifest) -> GraphRunner:
        return TensorRTRunner(
            folder, manifest, self.device, max(1, self.settings.batch_size), self.settings.max_sequence_length
        )
