"""The whole loop against a real PACS: Orthanc auto-routes studies to the node (`dicom-node serve`, embedded queue,
built-in demo model); the node's results come back into the same study in Orthanc and pass dciodvfy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from dicom_node.config import load_settings
from dicom_node.devtools.orthanc import NodeModality, Orthanc
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from tests.conftest import free_port, make_study
from tests.corpus import corpus_file
from tests.orthanc import requires_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow, requires_orthanc]


class Site:
    """Orthanc as the hospital PACS, and the node as `dicom-node serve` sending results back to it."""

    def __init__(self, tmp_path: Path, backend: str = "transformers") -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.pacs = Orthanc(tmp_path / "pacs", node=NodeModality("AINODE", "127.0.0.1", self.port), stable_age=1)
        self.config = tmp_path / "node.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "node": {"port": self.port, "bind": "127.0.0.1", "data_dir": str(tmp_path / "var")},
                    "study": {"stable_seconds": 1},
                    "queue": {"reconcile_seconds": 2},
                    "model": {"family": "demo", "backend": backend},
                    "destinations": [
                        {"name": "pacs", "ae_title": self.pacs.aet, "host": "127.0.0.1", "port": self.pacs.dicom_port}
                    ],
                    "rules": [{"name": "all", "outputs": ["sr", "gsps"]}],
                }
            )
        )
        self.settings = load_settings(self.config)
        self.node: subprocess.Popen[bytes] | None = None

    def start_node(self) -> None:
        log = (self.tmp_path / "serve.log").open("ab")
        self.node = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if subprocess.run(["echoscu", "-aec", "AINODE", "127.0.0.1", str(self.port)]).returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError("node did not start")

    def stop_node(self, sig: int = signal.SIGTERM) -> None:
        if self.node is not None and self.node.poll() is None:
            os.killpg(self.node.pid, sig)
            self.node.wait(timeout=30)

    def jobs(self) -> list[Any]:
        store = JobStore(self.settings.store_url)
        try:
            return store.list_jobs()
        finally:
            store.close()

    def node_has(self, sop_instance_uid: str) -> bool:
        """True once the node has received and recorded this instance."""
        store = JobStore(self.settings.store_url)
        try:
            return store.has_instance(sop_instance_uid)
        finally:
            store.close()

    def wait_jobs(self, count: int, timeout: float = 180) -> list[Any]:
        deadline = time.monotonic() + timeout
        jobs: list[Any] = []
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if len(jobs) >= count and all(j.state.finished for j in jobs):
                return jobs
            time.sleep(0.5)
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (self.tmp_path / "var" / "logs").glob("*"))
        raise AssertionError(f"jobs: {[(j.id, j.state.value, j.error) for j in jobs]}\n{logs}")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    s.pacs.start()
    yield s
    s.stop_node()
    s.pacs.kill()


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def results_in_pacs(site: Site, study_uid: str, dest: Path) -> dict[str, list[pydicom.Dataset]]:
    study_id = site.pacs.find_study(study_uid)
    assert study_id is not None
    found: dict[str, list[pydicom.Dataset]] = {}
    dest.mkdir(parents=True, exist_ok=True)
    for series in site.pacs.study_series(study_id):
        modality = series["MainDicomTags"].get("Modality", "")
        for instance in site.pacs.instances_of_series(series["ID"]):
            path = site.pacs.download_instance(instance["ID"], dest / f"{instance['ID']}.dcm")
            if modality in ("SR", "PR"):
                assert dciodvfy_errors(path) == [], f"{modality} {path} is not valid DICOM"
            found.setdefault(modality, []).append(pydicom.dcmread(path))
    return found


def test_pacs_routes_cr_ct_and_mr_and_gets_valid_sr_and_gsps_back(site: Site, tmp_path: Path) -> None:
    site.start_node()
    cr = corpus_file("RG1_UNCI.dcm")
    ct = make_study(tmp_path / "ct", 5, "693_UNCI.dcm")
    mr = corpus_file("MR2_UNCI.dcm")
    for path in [cr, *ct, mr]:
        site.pacs.upload(path)
    jobs = site.wait_jobs(3)
    assert all(j.state is JobState.DELIVERED for j in jobs), [(j.id, j.state, j.error) for j in jobs]

    for source in (cr, ct[0], mr):
        src = pydicom.dcmread(source, stop_before_pixels=True)
        uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for p in ([source] if source not in ct else ct)}
        found = results_in_pacs(site, src.StudyInstanceUID, tmp_path / "dl" / src.SOPInstanceUID)
        assert len(found.get("SR", [])) == 1, f"one SR in the study, got {list(found)}"
        sr = found["SR"][0]
        assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
        evidence = {
            str(i.ReferencedSOPInstanceUID)
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence
            for i in se.ReferencedSOPSequence
        }
        assert evidence <= uids and evidence, "the SR references the study's images"
        for pr in found.get("PR", []):
            referenced = {
                str(i.ReferencedSOPInstanceUID)
                for s in pr.ReferencedSeriesSequence
                for i in s.ReferencedImageSequence
            }
            assert referenced <= uids
    # The chest radiograph: the demo model finds regions, so the viewer gets GSPS boxes on it.
    chest = results_in_pacs(site, pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID, tmp_path / "cr2")
    assert chest.get("PR"), "GSPS boxes on the chest radiograph"


def test_pacs_outage_during_export_every_result_arrives_once(site: Site, tmp_path: Path) -> None:
    site.start_node()
    source = pydicom.dcmread(corpus_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    site.pacs.upload(corpus_file("RG1_UNCI.dcm"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not site.node_has(source.SOPInstanceUID):
        time.sleep(0.05)
    # The PACS fails the moment it has routed the study: the node's job starts only once the study is stable (1 s),
    # so every export attempt meets a PACS that is down. A clean stop takes seconds, longer than a whole demo job.
    site.pacs.kill()
    jobs: list[Any] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = site.jobs()
        if jobs and jobs[0].state is JobState.SUCCEEDED and jobs[0].error:
            break  # an export attempt failed and is waiting to retry
        time.sleep(0.3)
    assert jobs and jobs[0].state is JobState.SUCCEEDED and jobs[0].error, [(j.state, j.error) for j in jobs]
    site.pacs.start()
    job = site.wait_jobs(1, timeout=120)[0]
    assert job.state is JobState.DELIVERED
    found = results_in_pacs(site, source.StudyInstanceUID, tmp_path / "dl")
    assert len(found["SR"]) == 1 and len(found.get("PR", [])) == 1


def test_node_killed_before_export_delivers_same_uids_after_restart(site: Site, tmp_path: Path) -> None:
    site.pacs.stop()  # results cannot leave the outbox yet
    site.start_node()
    files = make_study(tmp_path / "s", 1, "RG1_UNCI.dcm")
    assert subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(site.port), str(files[0])]).returncode == 0
    deadline = time.monotonic() + 90
    job = None
    while time.monotonic() < deadline:
        jobs = site.jobs()
        job = jobs[0] if jobs else None
        if job is not None and job.state is JobState.SUCCEEDED and job.error:
            break
        time.sleep(0.3)
    assert job is not None and job.state is JobState.SUCCEEDED
    store = JobStore(site.settings.store_url)
    before = {r["sop_instance_uid"] for r in store.job_results(job.id)}
    store.close()
    assert before
    site.stop_node(signal.SIGKILL)  # crash between inference and delivery
    site.pacs.start()
    site.start_node()
    job = site.wait_jobs(1, timeout=120)[0]
    assert job.state is JobState.DELIVERED
    store = JobStore(site.settings.store_url)
    after = {r["sop_instance_uid"] for r in store.job_results(job.id)}
    store.close()
    assert after == before
    assert before <= site.pacs.sop_instance_uids()


def _sr_boxes(sr: pydicom.Dataset) -> list[tuple[float, ...]]:
    """The extents (x0, y0, x1, y1) of every SCOORD of an SR, sorted."""
    boxes = []

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD":
                data = [float(v) for v in item.GraphicData]
                xs, ys = data[0::2], data[1::2]
                boxes.append((round(min(xs), 3), round(min(ys), 3), round(max(xs), 3), round(max(ys), 3)))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return sorted(boxes)


def test_onnxruntime_backend_delivers_the_same_boxes_as_transformers(tmp_path: Path) -> None:
    """The whole loop with model.backend onnxruntime (after `dicom-node model export`): the SR that reaches the
    PACS carries exactly the boxes the transformers backend finds for the same image."""
    from inference.config import ModelSettings
    from inference.engine import Engine

    site = Site(tmp_path, backend="onnxruntime")
    site.pacs.start()
    try:
        export = subprocess.run([sys.executable, "-m", "dicom_node.cli", "model", "export", "--config",
                                 str(site.config)], capture_output=True, text=True, timeout=600)
        assert export.returncode == 0, export.stdout + export.stderr
        site.start_node()
        cr = corpus_file("RG1_UNCI.dcm")
        site.pacs.upload(cr)
        jobs = site.wait_jobs(1)
        assert jobs[0].state is JobState.DELIVERED, (jobs[0].state, jobs[0].error)
        found = results_in_pacs(site, pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID, tmp_path / "dl")
        delivered = _sr_boxes(found["SR"][0])
    finally:
        site.stop_node()
        site.pacs.kill()
    reference = Engine.load(ModelSettings(family="demo", backend="transformers")).run_study([cr], "grounded_report")
    expected = sorted(
        (round(f.box.x0, 3), round(f.box.y0, 3), round(f.box.x1, 3), round(f.box.y1, 3))
        for f in reference.findings if f.box is not None
    )
    assert expected, "the demo model finds regions on the chest radiograph"
    assert delivered == expected
