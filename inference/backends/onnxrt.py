"""The ``onnxruntime`` backend: the checkpoint's ONNX export on ONNX Runtime, CPU everywhere, CUDA where installed.

On CUDA, the graphs read and write torch CUDA tensors through I/O bindings: the KV buffers are preallocated on the
GPU for each batch, and a decode step writes only the new token's keys and values into them. On the CPU the graphs
take and give numpy arrays (the buffers are numpy arrays, written the same way). ``model.device: cuda[:N]`` needs
the ``onnxruntime-gpu`` package and NVIDIA's CUDA libraries; without them the worker stops at start-up saying so.
Where the site's ONNX Runtime also offers the TensorRT execution provider, it is tried first (engines cached beside
the export), then CUDA.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from inference.backends.graphs import GraphBackend, GraphRunner, TorchArrays
from inference.errors import ModelLoadError
from inference.export.manifest import ExportManifest

__all__ = ["BoundOnnxRuntimeRunner", "OnnxRuntimeBackend", "OnnxRuntimeRunner"]

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
    """One ONNX Runtime session per graph, on numpy arrays (the CPU)."""

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
        return list(self.sessions[graph].run(None, feeds))

    def to_host(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def describe(self) -> dict[str, str]:
        return {"execution provider": self.providers[0]}


_ELEMENT_TYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
#: ONNX Runtime's type names of graph outputs, as torch dtype names.
_OUTPUT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                 "tensor(int32)": "int32", "tensor(bool)": "bool"}


class BoundOnnxRuntimeRunner(TorchArrays, OnnxRuntimeRunner):
    """ONNX Runtime through I/O bindings on torch tensors of one device (CUDA at a site; the CPU in the tests).

    Inputs and outputs are bound by address, so values stay on the device between graphs and steps. An output whose
    shape follows from the inputs' named axes is written into a tensor allocated here; one whose shape depends on
    the values (the vision graph's rows) is allocated by ONNX Runtime and copied once.
    """

    def __init__(self, folder: Path, manifest: ExportManifest, device: str, threads: int = 0) -> None:
        import torch

        super().__init__(folder, manifest, device, threads)
        self.torch = torch
        self.device = torch.device(device if ":" in device or device == "cpu" else f"{device}:0")
        self._placeholder = torch.zeros(1, device=self.device)  # the address of an empty tensor
        self.output_dims = {
            name: {o.name: (list(o.shape), _OUTPUT_TYPES[o.type]) for o in session.get_outputs()}
            for name, session in self.sessions.items()
        }
        self.input_dims = {
            name: {i.name: list(i.shape) for i in session.get_inputs()} for name, session in self.sessions.items()
        }

    def _address(self, tensor: Any) -> int:
        return int(tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr())

    def run(self, graph: str, feeds: dict[str, Any]) -> list[Any]:
        torch = self.torch
        session = self.sessions[graph]
        binding = session.io_binding()
        sizes: dict[str, int] = {}
        held = []
        for name, value in feeds.items():
            tensor = self._on_device(value)
            held.append(tensor)
            for dim, size in zip(self.input_dims[graph][name], tensor.shape, strict=True):
                if isinstance(dim, str):
                    sizes[dim] = int(size)
            element = _ELEMENT_TYPES[str(tensor.dtype).removeprefix("torch.")]
            binding.bind_input(name, self.device_type, self.device_id, element, tuple(tensor.shape),
                               self._address(tensor))
        outputs: list[Any] = []
        for name, (dims, dtype) in self.output_dims[graph].items():
            shape = [sizes.get(d) if isinstance(d, str) else d for d in dims]
            if any(not isinstance(d, int) for d in shape):
                binding.bind_output(name, self.device_type, self.device_id)
                outputs.append(None)
                continue
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            binding.bind_output(name, self.device_type, self.device_id, _ELEMENT_TYPES[dtype], tuple(shape),
                                self._address(tensor))
            outputs.append(tensor)
        session.run_with_iobinding(binding)
        if any(o is None for o in outputs):
            allocated = binding.get_outputs()
            outputs = [torch.from_numpy(allocated[i].numpy()).to(self.device) if o is None else o
                       for i, o in enumerate(outputs)]
        return outputs


class OnnxRuntimeBackend(GraphBackend):
    """Runs the checkpoint's ONNX export with ONNX Runtime."""

    name: ClassVar[str] = "onnxruntime"

    def check_runtime(self) -> None:
        _import_onnxruntime()

    def open_runner(self, folder: Path, manifest: ExportManifest) -> GraphRunner:
        if self.device.startswith("cuda"):
            return BoundOnnxRuntimeRunner(folder, manifest, self.device)
        return OnnxRuntimeRunner(folder, manifest, self.device)
