"""Invariant 1 under a real crash: the node process is SIGKILLed while a sender is mid-study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.config import load_settings
from dicom_node.jobs.store import JobStore
from tests.conftest import free_port, make_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_node(config: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc


def wait_listening(port: int, timeout: float = 30) -> None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(CTImageStorage)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.2)
    raise AssertionError(f"node did not listen on {port} within {timeout} s")


def send_until_killed(port: int, files: list[Path], acknowledged: list[str], stop: threading.Event) -> None:
    """Send each file on its own association, remembering which instances got Success."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    for path in files:
        if stop.is_set():
            return
        ds = pydicom.dcmread(path)
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
            if not assoc.is_established:
                return
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                acknowledged.append(ds.SOPInstanceUID)
            assoc.release()
        except Exception:
            return


def test_sigkill_mid_study_loses_nothing_and_processes_once(tmp_path: Path, store_section: dict[str, Any]) -> None:
    port = free_port()
    data_dir = tmp_path / "var"
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"port": port, "bind": "127.0.0.1", "data_dir": str(data_dir)},
                "study": {"stable_seconds": 2, "max_wait_seconds": 600},
                "queue": {"start_workers": False},
                **store_section,
            }
        )
    )
    files = make_study(tmp_path / "study", 40)
    log = tmp_path / "node.log"
    node = start_node(config, log)
    try:
        wait_listening(port)
        acknowledged: list[str] = []
        stop = threading.Event()
        sender = threading.Thread(target=send_until_killed, args=(port, files, acknowledged, stop))
        sender.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        stop.set()
        sender.join(timeout=30)
        assert 12 <= len(acknowledged) < len(files), "the crash must land mid-study"

        # Everything that got Success is on disk and recorded, before any restart logic runs.
        settings = load_settings(config)
        store = JobStore(settings.store_url)
        for uid in acknowledged:
            assert store.has_instance(uid), f"acknowledged instance {uid} not recorded"
        on_disk = {p.stem for p in (data_dir / "spool").rglob("*.dcm")}
        assert set(acknowledged) <= on_disk
        store.close()

        # Restart; the PACS re-sends the whole study (it never got Success for some).
        node = start_node(config, log)
        wait_listening(port)
        result = subprocess.run(
            ["storescu", "-aec", "AINODE", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        store = JobStore(settings.store_url)
        deadline = time.monotonic() + 30
        while not store.list_jobs() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # longer than stable_seconds: a second job would have appeared by now
        jobs = store.list_jobs()
        assert len(jobs) == 1, "the study must be processed exactly once"
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        assert jobs[0].study_uid == study_uid
        assert len(store.study_instances(study_uid)) == len(files)
        assert len(list((data_dir / "spool").rglob("*.dcm"))) == len(files)
        store.close()
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=10)
