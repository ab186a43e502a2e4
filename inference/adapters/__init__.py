"""Model adapters, one per family: model-specific geometry, prompts and answer parsing.

Adapters are looked up by ``model.family`` through :mod:`inference.registry`; importing this package imports no
adapter module.
"""

from inference.adapters.base import HFHandle, ModelAdapter, WeightFiles

__all__ = ["HFHandle", "ModelAdapter", "WeightFiles"]
