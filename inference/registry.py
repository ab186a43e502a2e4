"""Registries of model adapters and backends: name -> ``"module:Class"``, imported only when asked for.

Nothing heavy (torch, transformers, CUDA, TensorRT) is imported by this module; :func:`adapter_class` and
:func:`backend_class` import the one module they need, inside the worker that loads the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from inference.errors import ModelLoadError

if TYPE_CHECKING:
    from inference.adapters.base import ModelAdapter
    from inference.backends.base import Backend

__all__ = ["ADAPTERS", "BACKENDS", "adapter_class", "backend_class"]

#: ``model.family`` -> adapter class. Add a family by adding one line here and one module under adapters/.
ADAPTERS: dict[str, str] = {
    "demo": "inference.adapters.demo:DemoAdapter",
    "medrega": "inference.adapters.medrega:MedRegAAdapter",
    "internvl": "inference.adapters.internvl:InternVLAdapter",
    "qwen2_5_vl": "inference.adapters.qwen:Qwen25VLAdapter",
    "qwen3_vl": "inference.adapters.qwen:Qwen3VLAdapter",
    "medgemma": "inference.adapters.medgemma:MedGemmaAdapter",
}

#: ``model.backend`` -> backend class.
BACKENDS: dict[str, str] = {
    "transformers": "inference.backends.hf:TransformersBackend",
    "onnxruntime": "inference.backends.onnxrt:OnnxRuntimeBackend",
    "tensorrt": "inference.backends.tensorrt:TensorRTBackend",
}


def _import(kind: str, table: dict[str, str], key: str) -> type:
    try:
        target = table[key]
    except KeyError:
        raise ModelLoadError(f"unknown model {kind} {key!r}: expected one of {sorted(table)}") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"model {kind} {key!r} ({target}) cannot be imported: {exc}") from exc


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class registered for ``family``; :class:`ModelLoadError` when unknown or not importable."""
    return _import("family", ADAPTERS, family)


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name``; :class:`ModelLoadError` when unknown or not importable."""
    return _import("backend", BACKENDS, name)
