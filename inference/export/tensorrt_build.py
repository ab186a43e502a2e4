"""TensorRT engines from an export's ONNX graphs: one optimisation profile per graph, shapes from the dim names.

Works with NVIDIA TensorRT 10+ (module ``tensorrt``, at a site with a GPU) and with TensorRT for RTX (module
``tensorrt_rtx``, which builds engines ahead of time on a machine without a GPU: that is how the test suite proves
TensorRT accepts the node's graphs). The module object is passed in; nothing here imports TensorRT itself.

The graphs' dynamic axes carry the names the exporter gave them (``batch``, ``seq``, ``capacity`` of the KV
buffers, and the vision graph's own, e.g. ``images``); :func:`profile_shapes` turns them into (min, opt, max) shapes.
The optimum is a decode step: one new token read against buffers of a few hundred slots.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import ModelLoadError

__all__ = ["DimRanges", "EngineBuildError", "build_engine", "graph_inputs", "profile_shapes"]

logger = logging.getLogger(__name__)


class EngineBuildError(ModelLoadError):
    """TensorRT refused a graph or a profile; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class DimRanges:
    """(min, opt, max) of each named dynamic axis."""

    ranges: Mapping[str, tuple[int, int, int]]

    @classmethod
    def for_generation(cls, max_batch: int, max_sequence: int, extra: Mapping[str, tuple[int, int, int]] = {},
                       ) -> DimRanges:
        """The decoder's axes for batches up to ``max_batch`` and sequences up to ``max_sequence`` tokens."""
        opt_batch = max(1, min(4, max_batch))
        ranges = {
            "batch": (1, opt_batch, max_batch),
            "seq": (1, 1, max_sequence),
            "capacity": (0, max(1, min(256, max_sequence)), max_sequence),
            "images": (1, opt_batch, max_batch),
            **extra,
        }
        return cls(ranges)


def graph_inputs(path: Path) -> list[tuple[str, list[int | str], int]]:
    """(name, dims — an int or the axis name —, ONNX element type) of each input of an ONNX graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = []
    for value in model.graph.input:
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor.shape.dim]
        inputs.append((value.name, dims, int(tensor.elem_type)))
    return inputs


def profile_shapes(path: Path, ranges: DimRanges) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of each input of a graph with dynamic axes; an unnamed axis is an error."""
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name, dims, _ in graph_inputs(path):
        if all(isinstance(d, int) for d in dims):
            continue
        triple: list[list[int]] = [[], [], []]
        for dim in dims:
            if isinstance(dim, int):
                for shape in triple:
                    shape.append(dim)
                continue
            if dim not in ranges.ranges:
                raise EngineBuildError(
                    f"input {name!r} of {path.name} has the dynamic axis {dim!r}, for which no range is known "
                    f"(known: {', '.join(sorted(ranges.ranges))})"
                )
            for shape, value in zip(triple, ranges.ranges[dim], strict=True):
                shape.append(value)
        shapes[name] = (tuple(triple[0]), tuple(triple[1]), tuple(triple[2]))
    return shapes


def build_engine(trt: Any, path: Path, ranges: DimRanges, *, fp16: bool = False, workspace_mb: int = 0) -> bytes:
    """A serialised engine of the ONNX graph at ``path``; :class:`EngineBuildError` with TensorRT's messages."""
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {path.name}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(path, ranges).items():
        profile.set_shape(name, low, opt, high)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT refused the optimisation profile of {path.name}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {path.name} (see the TensorRT log above)")
    return bytes(serialized)
