"""The container images and the compose stack, built and run as a site would: podman builds the images from
docker/Dockerfile*, podman-compose starts docker/compose.yaml (Redis, PostgreSQL, node, export and inference
worker), dcmtk's storescu sends a real study from outside the containers, and the SR and GSPS arrive at a Storage
SCP outside them. Then: `compose down` and `up` keep the job history and the spool; an inference worker container
killed with SIGKILL mid-job has its job redelivered and delivered once; the images run as non-root users and hold
no test data and no weights.

Minutes and root-only (podman): run by `make test-images`, which installs podman, runc, debootstrap and
podman-compose and sets DICOM_NODE_TEST_IMAGES=1; the normal test run skips this file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from dicom_node.devtools.receiver import Receiver, free_port
from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.jobs.store import JobStore
from tests.conftest import make_study

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROJECT = "dicomnodetest"
IMAGES = ["dicom-ai-node:latest", "dicom-ai-inference:cpu", "dicom-ai-redis:latest", "dicom-ai-postgres:latest"]
#: The inference task's hard limit in the stack's node.yaml; a running job's lease is 1.5 times this, so a worker
#: killed mid-job has its job queued again after at most that long.
INFERENCE_LIMIT = 45

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        os.environ.get("DICOM_NODE_TEST_IMAGES") != "1",
        reason="builds and runs the container images with podman (root, minutes): `make test-images` runs it "
        "(it sets DICOM_NODE_TEST_IMAGES=1)",
    ),
]

ENV = {**os.environ, "CONTAINERS_CONF": str(DOCKER / "podman" / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["podman", *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({run.returncode}): {run.stderr[-2000:]}")
    return run


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def built() -> list[str]:
    """The images, built by the same script as `make images` (layers cached from an earlier build)."""
    started = time.monotonic()
    run = subprocess.run(
        [str(DOCKER / "build-images.sh")], capture_output=True, text=True, env={**ENV, "ENGINE": "podman"}, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout, f"build-images.sh took {time.monotonic() - started:.0f} s", sep="\n")
    return IMAGES


class Stack:
    """docker/compose.yaml under podman-compose, with its ports, configuration and a receiving SCP on this host."""

    def __init__(self, tmp: Path, receiver: Receiver) -> None:
        self.tmp = tmp
        self.receiver = receiver
        self.dicom_port, redis_port, self.pg_port = free_port(), free_port(), free_port()
        self.password = secrets.token_urlsafe(16)
        config = tmp / "node.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "node": {"ae_title": "AINODE"},
                    "study": {"stable_seconds": 2},
                    "queue": {"reconcile_seconds": 2, "inference_time_limit": INFERENCE_LIMIT},
                    "model": {"family": "demo"},
                    "destinations": [receiver.destination()],
                    "rules": [{"name": "all", "outputs": ["sr", "gsps"]}],
                }
            )
        )
        config.chmod(0o644)
        models = tmp / "models"
        models.mkdir()
        self.env = {
            **ENV,
            "ENGINE": "podman",
            "COMPOSE_PROJECT_NAME": PROJECT,
            "DICOM_NODE_CONFIG": str(config),
            "MODELS_DIR": str(models),
            "DICOM_PORT": str(self.dicom_port),
            "REDIS_PORT": str(redis_port),
            "POSTGRES_PORT": str(self.pg_port),
            "POSTGRES_PASSWORD": self.password,
        }
        self.store_url = f"postgresql+psycopg://dicomnode:{self.password}@127.0.0.1:{self.pg_port}/dicomnode"

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(
            [str(DOCKER / "compose.sh"), *args], capture_output=True, text=True, env=self.env, timeout=600
        )
        assert run.returncode == 0, f"compose {' '.join(args)}: {run.stdout[-3000:]}{run.stderr[-3000:]}"
        return run

    def container(self, service: str) -> str:
        return f"{PROJECT}_{service}_1"

    def healthy(self, service: str) -> bool:
        return podman("healthcheck", "run", self.container(service), check=False, timeout=60).returncode == 0

    def up(self) -> None:
        self.compose("up", "-d")
        for service in ("redis", "postgres", "node"):
            wait_until(f"{service} to be healthy", lambda s=service: self.healthy(s), timeout=180, every=1)
        # The node's C-ECHO health check also passes from the inference worker's container.
        wait_until("the inference worker's health check", lambda: self.healthy("worker-inference"), 60, 1)

    def down(self) -> None:
        self.compose("down")

    def logs(self) -> str:
        out = []
        for service in ("node", "worker-inference", "worker-export"):
            run = podman("logs", "--tail", "30", self.container(service), check=False)
            out.append(f"--- {service}\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
        return "\n".join(out)

    def jobs(self) -> list[JobRecord]:
        store = JobStore(self.store_url)
        try:
            return store.list_jobs()
        finally:
            store.close()

    def job_detail(self, job_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        store = JobStore(self.store_url)
        try:
            return store.job_events(job_id), store.job_results(job_id)
        finally:
            store.close()

    def wait_job(self, study_uid: str, predicate: Callable[[JobRecord], bool], timeout: float) -> JobRecord:
        found: list[JobRecord] = []

        def check() -> bool:
            found[:] = [j for j in self.jobs() if j.study_uid == study_uid]
            return bool(found) and predicate(found[0])

        try:
            wait_until(f"the job of study {study_uid[-12:]}", check, timeout, every=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {[(j.id, j.state.value, j.error) for j in found]}\n{self.logs()}") from None
        return found[0]

    def send(self, files: list[Path]) -> None:
        """dcmtk's storescu on this host, outside the containers, to the node's published DICOM port."""
        run = subprocess.run(
            ["storescu", "-aec", "AINODE", "-aet", "MODALITY", "127.0.0.1", str(self.dicom_port), *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr

    def volume_dir(self, name: str) -> Path:
        return Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{PROJECT}_{name}").stdout.strip())


def _remove_stack(env: dict[str, str]) -> None:
    subprocess.run([str(DOCKER / "compose.sh"), "down", "-v"], capture_output=True, env=env, timeout=600)
    podman("network", "rm", f"{PROJECT}_default", check=False)


@pytest.fixture(scope="module")
def stack(built: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    (tmp / "received").mkdir()
    receiver = Receiver("PACS", store_dir=tmp / "received").start()
    s = Stack(tmp, receiver)
    _remove_stack(s.env)  # left over by an interrupted run
    started = time.monotonic()
    s.up()
    print(f"stack up and healthy in {time.monotonic() - started:.0f} s")
    yield s
    _remove_stack(s.env)
    receiver.stop()


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".engine"}
#: The demo model's packaged checkpoint is part of the product (family `demo`), not a model a site brings.
PRODUCT_CHECKPOINT = "site-packages/inference/demo/checkpoint/model.safetensors"
#: pydicom's colour palettes (PET, hot iron, ...) are Palette Color LUT objects of the standard, read by
#: pydicom's apply_color_lut: data of the library, not images.
LIBRARY_DICOM = "site-packages/pydicom/data/palettes"
TEST_DATA_DIRS = (
    "site-packages/data_store",
    "site-packages/pydicom/data/test_files",
    "site-packages/pydicom/data/charset_files",
    "site-packages/pynetdicom/tests",
)


def image_findings(root: Path) -> list[str]:
    """DICOM files, model weights (over 1 MB) and test-data folders in an image's file system."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in ("proc", "sys", "dev"):
            dirnames.clear()
            continue
        found += [f"test data folder /{rel}" for suffix in TEST_DATA_DIRS if rel.endswith(suffix)]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            if _is_dicom(path) and not rel.endswith(LIBRARY_DICOM):
                found.append(f"DICOM file /{rel}/{name}")
            elif path.suffix in WEIGHT_SUFFIXES and path.stat().st_size > 1_000_000:
                if not f"{rel}/{name}".endswith(PRODUCT_CHECKPOINT):
                    found.append(f"weights /{rel}/{name} ({path.stat().st_size} bytes)")
    return found


def test_images_run_as_non_root_and_hold_no_test_data_or_weights(built: list[str]) -> None:
    for image in built:
        user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
        assert user not in ("", "root", "0", "0:0"), f"{image} runs as {user or 'root'}"
        uid = podman("run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, f"{image} runs as uid {uid}"
        health = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image).stdout
        assert "CMD" in health, f"{image} has no HEALTHCHECK"
        root = Path(podman("image", "mount", image).stdout.strip())
        try:
            findings = image_findings(root)
            assert (root / "usr/bin").is_dir(), f"{image} mounted at {root} looks empty"
            if image.startswith("dicom-ai-inference"):
                assert list(root.glob(f"opt/venv/lib/python3*/{PRODUCT_CHECKPOINT}")), "the demo model is packaged"
        finally:
            podman("image", "unmount", image, check=False)
        assert findings == [], f"{image} holds test data or weights: {findings[:20]}"
    # Without the sample images the demo says what to install, and nothing else breaks.
    demo = podman("run", "--rm", "--network", "host", "dicom-ai-node:latest", "demo", check=False)
    assert demo.returncode == 1 and "pydicom-data" in demo.stdout + demo.stderr, demo.stdout + demo.stderr
    assert "Traceback" not in demo.stdout + demo.stderr


def test_a_study_sent_from_outside_comes_back_as_sr_and_gsps(stack: Stack, tmp_path: Path) -> None:
    files = make_study(tmp_path / "chest", 1, "RG1_UNCI.dcm")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    started = time.monotonic()
    stack.send(files)
    job = stack.wait_job(study_uid, lambda j: j.state.finished, timeout=240)
    assert job.state is JobState.DELIVERED, (job.state, job.error, stack.logs())
    print(f"study in, results delivered in {time.monotonic() - started:.0f} s")
    _, results = stack.job_detail(job.id)
    kinds = sorted(r["kind"] for r in results)
    assert kinds[0] == "gsps" and kinds.count("sr") == 1, kinds
    received = {uid: n for uid, n in stack.receiver.received.items() if uid in {r["sop_instance_uid"] for r in results}}
    assert received == {r["sop_instance_uid"]: 1 for r in results}, "every result arrived once at the receiving SCP"
    modalities = sorted(stack.receiver.modalities[uid] for uid in received)
    assert modalities.count("SR") == 1 and "PR" in modalities, modalities
    for uid in received:
        ds = pydicom.dcmread(stack.tmp / "received" / f"{uid}.dcm")
        assert ds.StudyInstanceUID == study_uid, "results go back into the study that was sent"


def test_compose_down_and_up_keeps_job_history_and_spool(stack: Stack) -> None:
    before = {j.id: (j.state, len(stack.job_detail(j.id)[0])) for j in stack.jobs()}
    assert before, "a job from the study sent before"
    spool = stack.volume_dir("node-data") / "spool"
    files_before = sorted(p.relative_to(spool) for p in spool.rglob("*") if p.is_file())
    assert files_before, f"nothing in the spool volume at {spool}"
    received_before = dict(stack.receiver.received)

    stack.down()
    running = podman("ps", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format", "{{.Names}}").stdout
    assert running.strip() == "", f"still running after down: {running}"
    started = time.monotonic()
    stack.up()
    print(f"stack up again in {time.monotonic() - started:.0f} s")

    spool = stack.volume_dir("node-data") / "spool"
    assert sorted(p.relative_to(spool) for p in spool.rglob("*") if p.is_file()) == files_before
    after = {j.id: (j.state, len(stack.job_detail(j.id)[0])) for j in stack.jobs()}
    assert after == before, "the job store on its volume keeps every job and its history"
    time.sleep(5)  # a few reconcile periods: nothing delivered is sent again
    assert dict(stack.receiver.received) == received_before


def test_inference_worker_killed_mid_job_is_redelivered_and_delivered_once(stack: Stack, tmp_path: Path) -> None:
    files = make_study(tmp_path / "kill", 1, "RG1_UNCI.dcm")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    worker = stack.container("worker-inference")
    restarts = int(podman("inspect", "--format", "{{.RestartCount}}", worker).stdout.strip())
    stack.send(files)
    running = stack.wait_job(study_uid, lambda j: j.state is JobState.RUNNING, timeout=120)
    # SIGKILL to the container's first process, as the out-of-memory killer or a crash would end it: the kernel
    # ends every process in the container, the task's message stays unacknowledged in Redis.
    pid = podman("inspect", "--format", "{{.State.Pid}}", worker).stdout.strip()
    os.kill(int(pid), 9)
    killed = stack.jobs()
    assert any(j.id == running.id and j.state is JobState.RUNNING for j in killed), "killed while the job ran"
    # The restart policy (unless-stopped) brings the worker back.
    wait_until(
        "the worker container's restart",
        lambda: int(podman("inspect", "--format", "{{.RestartCount}}", worker).stdout.strip()) > restarts,
        timeout=60,
    )
    job = stack.wait_job(study_uid, lambda j: j.state.finished, timeout=INFERENCE_LIMIT * 1.5 + 180)
    assert job.state is JobState.DELIVERED, (job.state, job.error, stack.logs())
    assert job.redeliveries == 1, f"redelivered once after the kill, got {job.redeliveries}"
    events, results = stack.job_detail(job.id)
    assert [e["kind"] for e in events].count("delivered") == 1, events
    uids = {r["sop_instance_uid"] for r in results}
    assert uids and {uid: stack.receiver.received[uid] for uid in uids} == dict.fromkeys(uids, 1), (
        "each result object was sent once"
    )


def test_podman_is_what_the_stack_ran_on() -> None:
    """Guards the skip: with DICOM_NODE_TEST_IMAGES=1 the tools must be there, not silently missing."""
    for tool in ("podman", "podman-compose", "storescu", "runc"):
        assert shutil.which(tool), f"{tool} is not installed (make test-images installs it)"
