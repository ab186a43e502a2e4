"""Runtimes that execute a model: one narrow interface (:class:`inference.backends.base.Backend`)."""

from inference.backends.base import Backend

__all__ = ["Backend"]
