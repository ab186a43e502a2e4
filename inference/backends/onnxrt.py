"""The ``onnxruntime`` backend: the checkpoint's ONNX export on ONNX Runtime, CPU everywhere, CUDA where installed.

On CUDA, values stay in ONNX Runtime's own arrays between decode steps (I/O binding), so the KV cache never leaves
the GPU; on the CPU the graphs take and give numpy arrays. ``model.device: cuda[:N]`` needs the ``onnxruntime-gpu``
package and NVIDIA's CUDA libraries; without them the worker stops at start-up saying so. Where the site's ONNX
Runtime also offers the TensorRT execution provider, it is tried first (engines cached beside the export), then CUDA.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from inference.backends.graphs import GraphBackend, GraphRunner
from inference.errors import ModelLoadError
from inference.export.manifest import ExportManifest

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner"]

logger = logging.getLogger(__name__)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError(
            "model.backend 'onnxruntime' needs the Python package onnxruntime (CPU) or onnxruntime-gpu (CUDA): "
            "pip install onnxruntime"
        ) from None
    return onnxruntime


class OnnxRuntimeRunner(GraphRunner):
    """One ONNX Runtime session per graph (run through I/O bindings on CUDA)."""

    def __init__(self, folder: Path, manifest: ExportManifest, device: str, threads: int = 0) -> None:
        super().__init__(folder, manifest)
        ort = _import_onnxruntime()
        self.ort = ort
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelLoadError(
                    f"model.device {device!r} with model.backend 'onnxruntime' needs onnxruntime-gpu and NVIDIA's CUDA "
                    f"libraries; this onnxruntime offers {', '.join(ort.get_available_providers())}: "
                    "pip install onnxruntime-gpu, or use model.device: cpu"
                )
            index = int(device.partition(":")[2] or 0)
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            if "TensorrtExecutionProvider" in ort.get_available_providers():
                # ONNX Runtime's TensorRT provider where the site installed it; its engines are cached beside the
                # export (one folder per export, so a changed checkpoint never meets an old engine).
                cache = folder / "onnxruntime-tensorrt"
                cache.mkdir(exist_ok=True)
                providers.insert(0, ("TensorrtExecutionProvider", {
                    "device_id": index, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_fp16_enable": manifest.dtype == "float16",
                }))
            self.device_type, self.device_id = "cuda", index
        else:
            providers = ["CPUExecutionProvider"]
            self.device_type, self.device_id = "cpu", 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        # Idle pool threads sleep instead of spinning: a worker's own threads (the studies in flight reading their
        # images) share these cores. Measured on 2 cores, demo model, batch 8: 87 ms spinning, 48 ms not.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initialisers are noise for an administrator
        self.sessions: dict[str, Any] = {}
        for name, graph in manifest.graphs.items():
            try:
                self.sessions[name] = ort.InferenceSession(str(folder / graph.file), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for a bad or truncated graph
                raise ModelLoadError(
                    f"ONNX Runtime cannot load graph {name!r} from {str(folder / graph.file)!r}: {exc}; run "
                    "`dicom-node model export --force`"
                ) from exc
        self.providers = self.sessions["decoder"].get_providers()

    def run(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        session = self.sessions[graph]
        if self.device_type == "cpu":  # host arrays in and out: cheaper than I/O bindings (10% at batch 8 here)
            return list(session.run(None, feeds))
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = self.ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(value), self.device_type, self.device_id
                )
            binding.bind_ortvalue_input(name, value)
        for name in self.manifest.graphs[graph].outputs:
            binding.bind_output(name, self.device_type, self.device_id)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs())

    def to_host(self, value: Any) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else np.asarray(value.numpy())

    def describe(self) -> dict[str, str]:
        return {"execution provider": self.providers[0]}


class OnnxRuntimeBackend(GraphBackend):
    """Runs the checkpoint's ONNX export with ONNX Runtime."""

    name: ClassVar[str] = "onnxruntime"

    def check_runtime(self) -> None:
        _import_onnxruntime()

    def open_runner(self, folder: Path, manifest: ExportManifest) -> GraphRunner:
        return OnnxRuntimeRunner(folder, manifest, self.device)
