"""``dicom-node model export``: a checkpoint exported once to ONNX graphs, checked, and recorded in a manifest.

The adapter splits the model (:meth:`inference.adapters.base.ModelAdapter.export_plan`); this module exports each
graph with ``torch.onnx.export(dynamo=True)``, runs it on ONNX Runtime against torch for the export inputs and for
inputs of another batch size (or image size), and only then writes the manifest and moves the folder into place.
A half-written export is never visible under the final name: a worker sees a complete export or none.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from inference.adapters.base import ModelAdapter, checkpoint_fingerprint
from inference.config import ModelSettings
from inference.errors import ModelLoadError
from inference.export.manifest import (
    ExportManifest,
    ExportMissingError,
    GraphInfo,
    export_folder,
    find_export,
)
from inference.registry import adapter_class

__all__ = ["OPSET", "ExportError", "Progress", "export_checkpoint"]

logger = logging.getLogger(__name__)

OPSET = 20
#: Largest difference allowed between ONNX Runtime and torch on the export's own check inputs, relative to the
#: output's largest magnitude (absolute below 1).
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}

#: ``progress(stage, done, total)``: called before each stage and once at the end (done == total).
Progress = Callable[[str, int, int], None]


class ExportError(ModelLoadError):
    """The export failed: the message names the graph and the reason."""


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__}


def _max_difference(expected: Any, got: list[np.ndarray]) -> float:
    import torch

    values = expected if isinstance(expected, tuple | list) else (expected,)
    worst = 0.0
    for want, have in zip(values, got, strict=True):
        want_np = want.detach().float().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
        if want_np.shape != have.shape:
            raise ExportError(f"output shape {have.shape} differs from torch's {want_np.shape}")
        if want_np.size:
            want32 = want_np.astype(np.float32)
            scale = max(1.0, float(np.abs(want32).max()))  # half precision keeps ~3 significant digits
            worst = max(worst, float(np.abs(want32 - have.astype(np.float32)).max()) / scale)
    return worst


def _export_graph(spec: Any, path: Path, dtype: str) -> float:
    """Export one graph and check it on ONNX Runtime; the largest difference to torch over its check inputs."""
    import onnxruntime
    import torch

    captured = io.StringIO()
    # one line per merged initialiser, and one per torchvision operator that is not installed, otherwise
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                spec.module,
                spec.args,
                str(path),
                dynamo=True,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=spec.dynamic_shapes,
                opset_version=OPSET,
                external_data=True,
                verbose=False,
            )
    except Exception as exc:
        logger.debug("torch.onnx.export output for %s:\n%s", spec.name, captured.getvalue())
        raise ExportError(f"graph {spec.name!r} cannot be exported: {type(exc).__name__}: {exc}") from exc
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for args in [spec.args, *spec.checks]:
        with torch.inference_mode():
            expected = spec.module(*args)
        feeds = {name: value.numpy() for name, value in zip(spec.input_names, args, strict=True)}
        try:
            got = session.run(None, feeds)
        except Exception as exc:  # onnxruntime's own error types: a shape the graph froze at export
            shapes = {name: tuple(v.shape) for name, v in feeds.items()}
            raise ExportError(
                f"graph {spec.name!r} was exported but does not run for inputs of shapes {shapes}: {exc}"
            ) from exc
        worst = max(worst, _max_difference(expected, got))
    if worst > TOLERANCE[dtype]:
        raise ExportError(
            f"graph {spec.name!r} differs from torch by up to {worst:.3g} (more than {TOLERANCE[dtype]}) on its "
            "check inputs"
        )
    return worst


def export_checkpoint(
    settings: ModelSettings,
    *,
    dtype: str = "float32",
    force: bool = False,
    progress: Progress | None = None,
) -> tuple[Path, bool]:
    """Export ``settings``' checkpoint; (the export folder, whether it was written now rather than found valid).

    Raises :class:`ModelLoadError` (its subclasses :class:`ExportError`,
    :class:`~inference.export.manifest.ExportUnsupportedError`) with a message for the administrator.
    """
    import torch

    from inference.backends.hf import set_offline

    def tell(stage: str, done: int, total: int) -> None:
        logger.info("export: %s (%d/%d)", stage, done, total)
        if progress is not None:
            progress(stage, done, total)

    if dtype not in TOLERANCE:
        raise ExportError(f"export dtype must be one of {sorted(TOLERANCE)}, got {dtype!r}")
    if settings.export_dir is None:
        raise ExportError("model.export_dir is not set: the node sets it to <node.data_dir>/model-exports")
    set_offline()
    adapter: ModelAdapter = adapter_class(settings.family)(settings)
    adapter.check_exportable()
    directory = adapter.check_checkpoint()
    fingerprint = checkpoint_fingerprint(directory)
    folder = export_folder(settings.export_dir, adapter.family, fingerprint)
    if folder.is_dir() and not force:
        try:
            _, existing = find_export(settings.export_dir, adapter.family, directory, fingerprint)
        except ExportMissingError as exc:
            logger.info("the export in %s is not usable (%s): exporting again", folder, exc)
        else:
            if existing.dtype != dtype:
                raise ExportError(
                    f"the export in {str(folder)!r} is {existing.dtype}, not {dtype}; one export per checkpoint "
                    f"version: run the command again with --force to replace it with a {dtype} export"
                )
            return folder, False
    started = time.perf_counter()
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    tell(f"loading {directory.name}", 0, 1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the export has its own progress display
    handle = adapter.hf_load(directory, "cpu", torch_dtype, "sdpa")
    plan = adapter.export_plan(handle)
    total = len(plan.graphs) + 2
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    graphs: dict[str, GraphInfo] = {}
    differences: dict[str, str] = {}
    try:
        for index, spec in enumerate(plan.graphs, start=1):
            tell(f"exporting and checking the {spec.name} graph", index, total)
            difference = _export_graph(spec, partial / f"{spec.name}.onnx", dtype)
            graphs[spec.name] = GraphInfo(f"{spec.name}.onnx", tuple(spec.input_names), tuple(spec.output_names))
            differences[spec.name] = f"{difference:.3g}"
        tell("writing the manifest", total - 1, total)
        manifest = ExportManifest(
            family=adapter.family,
            checkpoint=directory.name,
            fingerprint=fingerprint,
            dtype=dtype,
            graphs=graphs,
            decoder=plan.decoder,
            image_token_id=plan.image_token_id,
            eos_token_ids=plan.eos_token_ids,
            pad_token_id=plan.pad_token_id,
            opset=OPSET,
            dim_ranges=dict(plan.dim_ranges),
            versions={**_versions(), **{f"max relative difference {k}": v for k, v in differences.items()}},
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        manifest.write(partial)
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    tell(f"done in {time.perf_counter() - started:.0f} s", total, total)
    return folder, True

