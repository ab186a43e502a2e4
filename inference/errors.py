"""Errors the inference library raises; the node turns them into a stopped worker or a failed job."""

from __future__ import annotations

__all__ = ["InferenceError", "ModelLoadError", "PoisonInputError"]


class InferenceError(Exception):
    """Base class of every error raised on purpose by :mod:`inference`."""


class ModelLoadError(InferenceError):
    """The checkpoint cannot be loaded: missing or wrong directory, missing files, unknown family or backend.

    The message names the path and the files expected. A worker that gets this at start-up stops: retrying
    does not help.
    """


class PoisonInputError(InferenceError):
    """The study has no usable image, or its pixels cannot be decoded. The job fails fast, without retry."""
