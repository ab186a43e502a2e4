"""Fixtures shared by every test package: free ports, node settings, a running node, synthetic studies."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import Settings, load_settings
from dicom_node.devtools.receiver import free_port
from dicom_node.jobs.schema import JobRecord
from dicom_node.node import Dispatcher, Node
from tests.corpus import corpus_file
from tests.pki import make_pki
from tests.postgres import PostgresServer, postgres_bin


class RecordingDispatcher:
    """Leaves jobs queued in the store: the node receives and assembles, and no worker runs them."""

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, job: JobRecord) -> bool:
        self.submitted.append(job.id)
        return True

    def queued_job_ids(self) -> set[int] | None:
        return None


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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates for the DICOM TLS tests (see tests/pki.py)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole run (skipped where PostgreSQL is not installed; ``make test`` installs it)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of an empty PostgreSQL database of this test's own."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job store URL of each supported backend: SQLite in tmp_path, and an empty PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Configuration sections that put a node's job store on each backend: none (SQLite under data_dir), or a
    ``store.url`` of an empty PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"store": {"url": request.getfixturevalue("postgres_url")}}


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
