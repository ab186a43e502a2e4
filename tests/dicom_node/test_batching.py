"""One inference worker serving many studies at once, for real: the node, `dicom-node worker` processes, the embedded
broker or a redis-server, a receiving PACS on loopback, the demo model or a tiny Qwen2.5-VL.

What is checked: studies in flight share the model's batches (seen in the worker's Prometheus metrics) and get the
findings they get alone; a bad image inside a batch fails its own job only; a worker killed mid-batch has every job
of the batch redelivered and delivered once; an urgent study overtakes routine ones waiting in the queue.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.devtools.receiver import Receiver
from dicom_node.jobs.schema import JobState
from inference.config import ModelSettings
from inference.demo.phantoms import generate_phantom
from inference.engine import Engine
from sr_writer.findings import InferenceResult
from tests.conftest import free_port, make_study
from tests.dicom_node import test_queue
from tests.dicom_node.test_intake import storescu
from tests.dicom_node.test_queue import Deployment, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The deployment, Redis, receiving PACS and tiny model fixtures of the queue tests.
deploy = test_queue.deploy
redis = test_queue.redis
receiver = test_queue.receiver
tiny_model = test_queue.tiny_model


def delivered(jobs: list[Any]) -> bool:
    return all(j.state is JobState.DELIVERED for j in jobs)


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} not in the worker's metrics"
    return float(found.group(1))


def _queued(d: Deployment, count: int) -> None:
    """Wait until ``count`` jobs are queued and enqueued (their messages wait for a worker)."""
    d.wait_jobs(lambda js: len(js) == count and all(j.state is JobState.QUEUED and j.enqueued_at for j in js))


def thin_strip(out_dir: Path) -> list[Path]:
    """A study of one 5 x 8000 image (synthetic pixels in a real CR header): Qwen2.5-VL's image processor refuses
    an aspect ratio over 200, so this image breaks any batch it is in."""
    path = make_study(out_dir, 1, "RG1_UNCI.dcm")[0]
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 5, 8000
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(5 * 8000, dtype=np.uint16) % 4096).tobytes()
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return [path]


def test_eight_studies_at_once_share_batches_and_get_the_findings_they_get_alone(
    deploy: Callable[..., Deployment], receiver: Receiver, tmp_path: Path
) -> None:
    port = free_port()
    d = deploy(
        queue={"inference_concurrency": 8, "worker_metrics_port": port},
        model={"family": "demo", "batch_size": 8, "batch_wait_ms": 500},
        destinations=[receiver.destination()],
    )
    node = d.start_node()
    rng = np.random.default_rng(8)
    files = {}
    for i in range(8):  # eight different studies: each must get its own answer back
        phantom = generate_phantom(rng, kind="radiograph", n_lesions=1 + i % 2)
        path = phantom.save(tmp_path / f"phantom-{i}.dcm")
        files[str(phantom.dataset.StudyInstanceUID)] = path
        assert storescu(node, [path]).returncode == 0
    _queued(d, 8)  # all eight wait in the queue when the worker starts
    d.start_worker("inference")
    d.start_worker("export")
    jobs = d.wait_jobs(lambda js: len(js) == 8 and delivered(js), timeout=240)

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    batches = _metric(metrics, "dicom_node_worker_batch_size_count")
    images = _metric(metrics, "dicom_node_worker_batch_size_sum")
    assert images == 8, "every image through the model once"
    assert batches < 8, f"the backend got batches larger than one image ({batches:g} batches for 8 images)"
    assert _metric(metrics, "dicom_node_worker_generated_tokens_total") > 8 * 5

    sent = {o["sop_instance_uid"] for j in jobs for o in d.store.job_results(j.id)}
    assert sent == set(receiver.received) and all(n == 1 for n in receiver.received.values())
    alone = Engine.load(ModelSettings(family="demo"))
    for job in jobs:
        assert job.result_path is not None
        batched = InferenceResult.from_json(Path(job.result_path).read_text(encoding="utf-8"))
        expected = alone.run_study([files[job.study_uid]], "grounded_report", "en")
        assert batched.findings == expected.findings, f"job {job.id}"
        assert any(f.box is not None for f in batched.findings)


def test_a_poison_image_inside_a_batch_fails_only_its_own_job(
    deploy: Callable[..., Deployment], receiver: Receiver, tiny_model: Path, tmp_path: Path
) -> None:
    d = deploy(
        queue={"inference_concurrency": 4},
        model={"family": "qwen2_5_vl", "path": str(tiny_model), "max_new_tokens": 8, "max_image_side": 8192,
               "batch_size": 4, "batch_wait_ms": 1000},
        destinations=[receiver.destination()],
    )
    node = d.start_node()
    poison = thin_strip(tmp_path / "poison")
    assert storescu(node, poison).returncode == 0
    for i in range(3):
        assert storescu(node, make_study(tmp_path / f"s{i}", 1, "RG1_UNCI.dcm")).returncode == 0
    _queued(d, 4)
    d.start_worker("inference")
    d.start_worker("export")
    jobs = d.wait_jobs(lambda js: len(js) == 4 and all(j.state.finished for j in js), timeout=180)
    poison_study = str(pydicom.dcmread(poison[0], stop_before_pixels=True).StudyInstanceUID)
    failed = [j for j in jobs if j.study_uid == poison_study]
    assert failed[0].state is JobState.FAILED
    assert "aspect ratio must be smaller than 200" in (failed[0].error or ""), failed[0].error
    others = [j for j in jobs if j.study_uid != poison_study]
    assert all(j.state is JobState.DELIVERED for j in others), [(j.id, j.state, j.error) for j in others]
    log = (tmp_path / "worker-0-inference.log").read_text(errors="replace")
    assert re.search(r"a batch of [2-4] images failed", log), "the bad image was inside a batch"


def test_worker_killed_mid_batch_every_job_is_redelivered_and_delivered_once(
    deploy: Callable[..., Deployment], redis: RedisServer, receiver: Receiver, tiny_model: Path, tmp_path: Path
) -> None:
    d = deploy(
        queue={"broker_url": redis.url, "inference_concurrency": 4},
        # Enough tokens that a batch runs for several seconds on this CPU.
        model={"family": "qwen2_5_vl", "path": str(tiny_model), "max_new_tokens": 400, "batch_size": 4,
               "batch_wait_ms": 1000},
        destinations=[receiver.destination()],
    )
    node = d.start_node()
    for i in range(4):
        assert storescu(node, make_study(tmp_path / f"s{i}", 1, "RG1_UNCI.dcm")).returncode == 0
    _queued(d, 4)
    d.start_worker("inference")
    running = d.wait_jobs(lambda js: len(js) == 4 and all(j.state is JobState.RUNNING and j.owner for j in js))
    owners = {j.owner for j in running}
    assert len(owners) == 1, "one worker holds the four studies"
    pid = int(next(iter(owners)).rpartition(":")[2])  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    next(p for p in d.workers if p.pid == pid).wait(timeout=30)  # reaped, as its supervisor would
    d.start_worker("inference")  # restarted, as the node's supervisor, systemd or a container runtime does
    d.start_worker("export")
    jobs = d.wait_jobs(lambda js: len(js) == 4 and delivered(js), timeout=240)
    assert all(j.redeliveries == 1 and j.attempts == 2 for j in jobs), [(j.redeliveries, j.attempts) for j in jobs]
    sent = {o["sop_instance_uid"] for j in jobs for o in d.store.job_results(j.id)}
    assert sent == set(receiver.received) and all(n == 1 for n in receiver.received.values())


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_an_urgent_study_sent_after_ten_routine_ones_overtakes_them(
    deploy: Callable[..., Deployment], redis: RedisServer, receiver: Receiver, tmp_path: Path, broker: str
) -> None:
    d = deploy(
        queue={"broker_url": "embedded" if broker == "embedded" else redis.url, "inference_concurrency": 1,
               "urgent_calling_aets": ["ER_CT"]},
        model={"family": "demo", "batch_size": 1},
        destinations=[receiver.destination()],
    )
    node = d.start_node()
    for i in range(10):
        assert storescu(node, make_study(tmp_path / f"routine{i}", 1, "RG1_UNCI.dcm")).returncode == 0
    d.wait_jobs(lambda js: len(js) == 10 and all(j.enqueued_at for j in js))
    urgent = make_study(tmp_path / "urgent", 1, "RG1_UNCI.dcm")
    assert storescu(node, urgent, "-aet", "ER_CT").returncode == 0
    _queued(d, 11)
    jobs = d.store.list_jobs()
    assert sorted(j.priority for j in jobs) == ["routine"] * 10 + ["urgent"]
    d.start_worker("inference")
    d.start_worker("export")
    jobs = d.wait_jobs(lambda js: len(js) == 11 and delivered(js), timeout=300)

    def delivered_at(job_id: int) -> float:
        return max(e["at"] for e in d.store.job_events(job_id) if e["kind"] == "delivered")

    first = next(j for j in jobs if j.priority == "urgent")
    later = [j for j in jobs if j.priority == "routine" and delivered_at(j.id) > delivered_at(first.id)]
    assert len(later) >= 8, f"the urgent study was delivered before only {len(later)} of the 10 routine ones"
    assert time.time() > delivered_at(first.id)
