"""The Celery pipeline for real: a redis-server, worker processes, the node, a receiving PACS on loopback.

No fakeredis and no eager mode: these tests start `redis-server` and `dicom-node worker` processes and kill or
restart them the way a hospital's night would.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import load_settings
from dicom_node.devtools.receiver import Receiver
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from dicom_node.node import Node
from tests.conftest import free_port, make_study
from tests.dicom_node.export_job import export_job, queued_job
from tests.dicom_node.test_intake import storescu
from tests.inference.tiny_models import build_qwen2_5_vl
from tests.orthanc import StoreRecorder
from tests.postgres import PostgresServer, postgres_bin

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen2_5_vl(tmp_path_factory.mktemp("model") / "tiny-qwen2_5_vl")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


class Deployment:
    """One node (in this process) and its worker processes, sharing a data_dir, configured by one YAML file."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.settings = load_settings(self.config_path)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.node: Node | None = None
        self.store = JobStore(self.settings.store_url)

    def start_node(self) -> Node:
        self.node = Node(self.settings, config_path=self.config_path)
        self.node.start()
        return self.node

    def start_worker(self, queues: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"worker-{len(self.workers)}-{queues}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(self.config_path), "--queues", queues],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def wait_jobs(self, predicate: Callable[[list[Any]], bool], timeout: float = 90) -> list[Any]:
        deadline = time.monotonic() + timeout
        jobs: list[Any] = []
        while time.monotonic() < deadline:
            jobs = self.store.list_jobs()
            if jobs and predicate(jobs):
                return jobs
            time.sleep(0.2)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in self.tmp_path.glob("*.log"))
        raise AssertionError(f"jobs did not reach the expected states: {[(j.id, j.state.value) for j in jobs]}\n{logs}")

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.store.close()


@pytest.fixture
def deploy(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []

    def make(**sections: Any) -> Deployment:
        config: dict[str, Any] = {
            "node": {"port": free_port(), "bind": "127.0.0.1", "data_dir": str(tmp_path / "var")},
            "study": {"stable_seconds": 1},
            "queue": {"start_workers": False, "reconcile_seconds": 1},
        }
        for name, values in sections.items():
            config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
        d = Deployment(tmp_path, config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def model(path: Path, tokens: int = 16) -> dict[str, Any]:
    return {"family": "qwen2_5_vl", "path": str(path), "max_new_tokens": tokens}


def delivered(jobs: list[Any]) -> bool:
    return all(j.state is JobState.DELIVERED for j in jobs)


def test_two_inference_workers_share_the_queue(
    deploy: Callable[..., Deployment], redis: RedisServer, tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    # One study at a time per worker, so that the second worker gets work while the first is busy.
    d = deploy(queue={"broker_url": redis.url, "inference_concurrency": 1}, model=model(tiny_model, 48),
               destinations=[receiver.destination()])
    d.start_worker("inference")
    d.start_worker("inference")
    d.start_worker("export")
    node = d.start_node()
    for i in range(4):
        assert storescu(node, make_study(tmp_path / f"s{i}", 1, "RG1_UNCI.dcm")).returncode == 0
    jobs = d.wait_jobs(lambda js: len(js) == 4 and delivered(js), timeout=180)
    owners = set()
    for job in jobs:
        owners |= {e["detail"] for e in d.store.job_events(job.id) if e["kind"] == "running"}
    assert len(owners) >= 2, f"both workers should have taken jobs: {owners}"
    sent = {o["sop_instance_uid"] for j in jobs for o in d.store.job_results(j.id)}
    assert sent == set(receiver.received) and all(n == 1 for n in receiver.received.values())


def test_a_replacement_worker_process_may_take_worker_start_seconds_to_load_its_model(tmp_path: Path) -> None:
    """Celery kills a pool process that has not reported up within worker_proc_alive_timeout (default 4 s); the
    replacement of a killed inference process loads the model first, so the node sets it from the configuration.
    With the default, the test below stalled whenever the tiny model's load took longer than 4 s."""
    from dicom_node.work.celery_app import make_celery

    settings = load_settings(None, {"queue": {"worker_start_seconds": 1234}, "node": {"data_dir": str(tmp_path)}})
    assert make_celery(settings).conf.worker_proc_alive_timeout == 1234
    assert load_settings(None, {"node": {"data_dir": str(tmp_path)}}).queue.worker_start_seconds >= 600


def test_worker_killed_mid_task_job_is_redelivered_and_completes_once(
    deploy: Callable[..., Deployment], redis: RedisServer, tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    # Enough tokens that the task runs for several seconds on this CPU.
    d = deploy(queue={"broker_url": redis.url}, model=model(tiny_model, 400), destinations=[receiver.destination()])
    d.start_worker("inference")
    d.start_worker("export")
    node = d.start_node()
    assert storescu(node, make_study(tmp_path / "s", 1, "RG1_UNCI.dcm")).returncode == 0
    running = d.wait_jobs(lambda js: js[0].state is JobState.RUNNING and js[0].owner is not None)
    pid = int(running[0].owner.rpartition(":")[2])
    os.kill(pid, signal.SIGKILL)  # the worker process holding the task, as the out-of-memory killer would
    killed = next(p for p in d.workers if p.pid == pid)
    killed.wait(timeout=30)  # reaped, as its supervisor would: a zombie still answers kill(pid, 0)
    d.start_worker("inference")  # restarted, as the node's supervisor, systemd or a container runtime does
    jobs = d.wait_jobs(delivered, timeout=180)
    assert jobs[0].redeliveries == 1 and jobs[0].attempts == 2
    assert all(n == 1 for n in receiver.received.values()) and receiver.received


def test_redis_down_then_back_nothing_lost(
    deploy: Callable[..., Deployment], redis: RedisServer, tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    d = deploy(queue={"broker_url": redis.url}, model=model(tiny_model), destinations=[receiver.destination()])
    d.start_worker("inference")
    d.start_worker("export")
    node = d.start_node()
    assert storescu(node, make_study(tmp_path / "before", 1, "RG1_UNCI.dcm")).returncode == 0
    d.wait_jobs(lambda js: delivered(js))

    redis.stop()
    # The SCP keeps accepting and spooling while the broker is down.
    assert storescu(node, make_study(tmp_path / "during", 2, "RG1_UNCI.dcm")).returncode == 0
    jobs = d.wait_jobs(lambda js: len(js) == 2)
    assert jobs[0].state is JobState.QUEUED and jobs[0].enqueued_at is None  # in the store, not in any broker
    time.sleep(2)
    redis.start()  # empty: whatever Redis held is gone
    jobs = d.wait_jobs(lambda js: len(js) == 2 and delivered(js), timeout=120)
    assert sum(receiver.received.values()) == len(receiver.received)


def test_job_store_down_when_the_worker_takes_the_job_is_retried_not_failed(
    deploy: Callable[..., Deployment], redis: RedisServer, tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    """A failure cannot be recorded while the database is away, and an outage is no reason to fail a job: the task
    tries again with backoff and the job runs once, as soon as the database is back."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    server = PostgresServer(bindir).start()
    try:
        d = deploy(
            queue={"broker_url": redis.url}, model=model(tiny_model), destinations=[receiver.destination()],
            store={"url": server.new_database()},
        )
        node = d.start_node()
        assert storescu(node, make_study(tmp_path / "s", 1, "RG1_UNCI.dcm")).returncode == 0
        d.wait_jobs(lambda js: js[0].state is JobState.QUEUED and js[0].enqueued_at is not None)
        server.stop_server()
        d.start_worker("inference,export")
        log = tmp_path / "worker-0-inference,export.log"
        deadline = time.monotonic() + 90
        while "job store unreachable" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        assert "trying again in 5 s" in log.read_text(errors="replace")
        server.start_server()
        jobs = d.wait_jobs(delivered, timeout=120)
        assert jobs[0].attempts == 1 and jobs[0].redeliveries == 0 and jobs[0].error is None
        assert receiver.received and all(n == 1 for n in receiver.received.values())
    finally:
        server.stop()


def test_poison_study_fails_once_with_reason(
    deploy: Callable[..., Deployment], redis: RedisServer, tiny_model: Path, tmp_path: Path
) -> None:
    d = deploy(queue={"broker_url": redis.url}, model=model(tiny_model))
    d.start_worker("inference")
    node = d.start_node()
    # A study with no image at all: a lone SR document.
    sr = tmp_path / "sr.dcm"
    import highdicom as hd  # noqa: F401  (only to make sure the SR tools are there)
    from pydicom.data import get_testdata_file

    doc = get_testdata_file("reportsi.dcm", download=False)
    assert doc is not None
    Path(sr).write_bytes(Path(doc).read_bytes())
    assert storescu(node, [sr]).returncode == 0
    jobs = d.wait_jobs(lambda js: js[0].state.finished)
    assert jobs[0].state is JobState.FAILED and jobs[0].attempts == 1
    assert jobs[0].error and jobs[0].error.startswith("unusable study:")


def test_embedded_broker_runs_a_study_end_to_end_without_redis(
    tmp_path: Path, tiny_model: Path, receiver: Receiver, store_section: dict[str, Any]
) -> None:
    """The node with its own workers (separate processes) on each job store backend."""
    port = free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"port": port, "bind": "127.0.0.1", "data_dir": str(tmp_path / "var")},
                "study": {"stable_seconds": 1},
                "model": model(tiny_model),
                "destinations": [receiver.destination()],
                **store_section,
            }
        )
    )
    log = (tmp_path / "serve.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        settings = load_settings(config)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            echo = subprocess.run(["echoscu", "-aec", "AINODE", "127.0.0.1", str(port)], capture_output=True)
            if echo.returncode == 0:
                break
            time.sleep(0.3)
        files = make_study(tmp_path / "s", 1, "RG1_UNCI.dcm")
        sent = subprocess.run(["storescu", "-aec", "AINODE", "127.0.0.1", str(port), str(files[0])])
        assert sent.returncode == 0
        store = JobStore(settings.store_url)
        deadline = time.monotonic() + 120
        jobs: list[Any] = []
        while time.monotonic() < deadline:
            jobs = store.list_jobs()
            if jobs and jobs[0].state.finished:
                break
            time.sleep(0.3)
        assert jobs and jobs[0].state is JobState.DELIVERED, (tmp_path / "serve.log").read_text()[-3000:]
        assert receiver.received
        store.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    # Stopping the node stopped its workers: none is left behind.
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True).stdout.split()
    assert left == [], f"workers left running: {left}"


def redis_cli(redis: RedisServer, *command: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(redis.port), *command], capture_output=True, text=True, check=True
    ).stdout.strip()


def waiting(redis: RedisServer, queue: str) -> int:
    """Messages waiting in ``queue`` on Redis, over its lists of every priority (kombu names them ``queue``, and
    ``queue`` + separator + priority for priorities above 0)."""
    keys = [k for k in redis_cli(redis, "--raw", "KEYS", f"{queue}*").splitlines() if k.startswith(queue)]
    return sum(int(redis_cli(redis, "LLEN", key)) for key in keys)


def test_an_enqueue_while_redis_is_down_is_logged_as_failed_and_retried_not_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    redis = RedisServer(tmp_path)  # not started: nothing listens on its port
    settings = load_settings(
        None,
        {"node": {"data_dir": str(tmp_path / "var")}, "queue": {"broker_url": redis.url, "start_workers": False}},
    )
    node = Node(settings)  # the Celery dispatcher; nothing started: the test runs the reconciler's passes itself
    try:
        job_id = queued_job(node.store, make_study(tmp_path / "s", 1)[0], [])
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            assert node.reconcile() == 0
        said = [r.getMessage() for r in caplog.records]
        failed = [m for m in said if f"job {job_id} NOT enqueued" in m]
        assert failed and "Connection refused" in failed[0], said
        assert any("enqueue failed" in m for m in said), said
        assert not any("job(s) enqueued" in m for m in said if m.startswith("reconciled")), said
        job = node.store.job(job_id)
        assert job is not None and job.state is JobState.QUEUED and job.enqueued_at is None

        redis.start()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dicom_node"):
            assert node.reconcile() == 1  # the next pass
        assert "reconciled: 1 job(s) enqueued" in [r.getMessage() for r in caplog.records]
        assert waiting(redis, "inference") == 1
        assert node.dispatcher.queued_job_ids() == {job_id}
        job = node.store.job(job_id)
        assert job is not None and job.enqueued_at is not None
    finally:
        node.store.close()
        redis.stop()


def test_a_queued_job_whose_message_a_redis_restart_lost_is_enqueued_again_and_runs(
    deploy: Callable[..., Deployment], redis: RedisServer, tiny_model: Path, receiver: Receiver, tmp_path: Path
) -> None:
    """Redis restarted without its data while a job waited for a worker: the node notices the message is gone and
    sends it again, instead of waiting for requeue_after_seconds (600 s here, far beyond the test's patience)."""
    d = deploy(
        queue={"broker_url": redis.url, "requeue_after_seconds": 600, "broker_check_seconds": 1},
        model=model(tiny_model), destinations=[receiver.destination()],
    )  # fmt: skip
    node = d.start_node()  # no worker yet: the job's message waits in Redis
    assert storescu(node, make_study(tmp_path / "s", 1, "RG1_UNCI.dcm")).returncode == 0
    jobs = d.wait_jobs(lambda js: js[0].state is JobState.QUEUED and js[0].enqueued_at is not None)
    assert waiting(redis, "inference") == 1

    redis.stop()
    redis.start()  # empty: the message is gone
    assert waiting(redis, "inference") == 0
    d.start_worker("inference")
    d.start_worker("export")
    jobs = d.wait_jobs(delivered, timeout=150)
    requeued = [e for e in d.store.job_events(jobs[0].id) if e["kind"] == "requeued"]
    assert len(requeued) == 1 and "no longer in the broker" in requeued[0]["detail"]
    assert receiver.received and all(n == 1 for n in receiver.received.values())


def test_a_running_export_keeps_its_message_in_redis_and_is_not_sent_again(
    redis: RedisServer, tmp_path: Path
) -> None:
    """The broker check must not mistake a task in a worker's hands for a lost one: Celery acknowledges late, so
    Redis keeps the message (in its ``unacked`` hash) while the export runs."""
    holding, release = threading.Event(), threading.Event()

    def respond(event: Any) -> int:
        holding.set()
        release.wait(60)
        return 0x0000

    with StoreRecorder("STORESCP", respond=respond) as pacs:
        destination = {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port, "timeout": 60}
        job = export_job(tmp_path, destination, 2, queue={"broker_url": redis.url})
        node = Node(job.settings)  # not started: the test runs the node's passes itself
        log = tmp_path / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(job.config_path), "--queues", "export"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            assert node.reconcile() == 1  # the export task goes to Redis
            deadline = time.monotonic() + 120
            while not holding.wait(0.2):
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            assert waiting(redis, "export") == 0  # taken by the worker...
            assert node.dispatcher.queued_job_ids() == {job.job_id}  # ...and still held by Redis
            assert node.requeue_lost() == 0 and node.requeue_lost() == 0
            release.set()
            deadline = time.monotonic() + 60
            while (done := node.store.job(job.job_id)) is None or done.state is not JobState.DELIVERED:
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
            assert sorted(pacs.sop_instance_uids()) == sorted(job.uids)  # each object once
            assert not [e for e in node.store.job_events(job.job_id) if e["kind"] == "requeued"]
        finally:
            release.set()
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
            node.store.close()
