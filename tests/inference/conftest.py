"""Fixtures of the inference tests: tiny random-weight checkpoints, built once per session and family."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_checkpoint(family)``: the directory of a tiny checkpoint of that family (built on first use)."""
    from tests.inference.tiny_models import BUILDERS

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = BUILDERS[family](directory)
        return built[family]

    return get
