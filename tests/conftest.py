"""Fixtures shared by every test package: free ports, node settings, a running node, synthetic studies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import Settings, load_settings
from dicom_node.receiver import free_port
from dicom_node.service import Dispatcher, Node, RecordingDispatcher
from tests.corpus import corpus_file


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings on loopback with a free port and a temporary data_dir; sections given as keyword overrides."""

    made: list[int] = []

    def make(**sections: Any) -> Settings:
        made.append(1)
        data_dir = tmp_path / f"var{len(made)}"
        overrides: dict[str, Any] = {
            "node": {"port": free_port(), "bind": "127.0.0.1", "data_dir": str(data_dir)},
            "study": {"stable_seconds": 1.0, "max_wait_seconds": 60},
            "queue": {"start_workers": False},  # tests that want workers start them themselves
        }
        for name, values in sections.items():
            if isinstance(values, dict) and isinstance(overrides.get(name), dict):
                overrides[name] = {**overrides[name], **values}
            else:
                overrides[name] = values
        return load_settings(None, overrides)

    return make


@pytest.fixture
def running_node(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Node]]:
    """Start an in-process node (SCP + assembler); stopped at teardown. Jobs stay queued unless a dispatcher
    is given."""
    started: list[Node] = []

    def start(dispatcher: Dispatcher | None = None, **sections: Any) -> Node:
        node = Node(make_settings(**sections), dispatcher=dispatcher or RecordingDispatcher())
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def make_study(
    out_dir: Path, count: int, template: str = "693_UNCI.dcm", study_uid: str | None = None
) -> list[Path]:
    """``count`` instances of one new synthetic study and series, made from a real corpus image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    base = pydicom.dcmread(corpus_file(template))
    paths = []
    for i in range(count):
        ds = base.copy()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out_dir / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
