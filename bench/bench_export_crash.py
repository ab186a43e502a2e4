"""C-STOREs sent per result object when the export worker is SIGKILLed mid-export, and what recording each
delivery as it is acknowledged costs a clean export.

A job with N result objects (synthetic CT instances) waits for its export; a pynetdicom Storage SCP stands in for
a slow PACS (``--delay`` seconds per C-STORE). A worker process runs ``run_export`` for the job; once the PACS has
received the run's first object the bench waits a random time (seeded) and SIGKILLs the worker, ``--kills`` times,
then lets a last worker finish. Figure: C-STOREs the PACS received / N (1.0: nothing sent twice; each kill can
cost at most the one object whose response was in flight when delivery is recorded per object).

``--code DIR`` runs the worker on another checkout of the node (``git archive <commit> | tar -x -C DIR``), to
measure the code before a change in the same run; the job store schema, the module paths and the configuration
keys the bench writes must be the same (a checkout from before the layout by stage, or before ``queue.retry``
and ``node.max_pending_per_host``, cannot run its worker: its clean run fails with the worker's log named).

    .venv/bin/python -m bench.bench_export_crash
    .venv/bin/python -m bench.bench_export_crash --code /tmp/before --objects 48 --kills 5 --delay 0.1
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pynetdicom import evt
from pynetdicom.status import Status

from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from tests.dicom_node.export_job import EXPORT_SCRIPT, export_job, wait_until
from tests.orthanc import StoreRecorder


def worker(job_config: Path, job_id: int, code: Path | None, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", EXPORT_SCRIPT, str(job_config), str(job_id)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(code) if code else None,
        )  # fmt: skip


def crash_run(objects: int, kills: int, delay: float, seed: int, code: Path | None, workdir: Path) -> dict[str, float]:
    rng = random.Random(seed)
    received = 0
    lock = threading.Lock()

    def respond(event: evt.Event) -> int:
        nonlocal received
        with lock:
            received += 1
        time.sleep(delay)
        return int(Status.SUCCESS)

    with StoreRecorder("STORESCP", respond=respond) as pacs:
        destination = {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port, "timeout": 60}
        job = export_job(workdir, destination, objects)
        killed = 0
        started = time.perf_counter()
        for _ in range(kills):
            before = received
            proc = worker(job.config_path, job.job_id, code, workdir / "worker.log")
            wait_until(lambda: received > before or proc.poll() is not None, 120, "a C-STORE from the worker")  # noqa: B023
            if proc.poll() is not None:
                break  # it finished before it could be killed
            time.sleep(rng.uniform(0, delay * objects / kills))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait()
        last = worker(job.config_path, job.job_id, code, workdir / "worker.log")
        last.wait(timeout=600)
        elapsed = time.perf_counter() - started
        store = JobStore(job.settings.store_url)
        state = store.job(job.job_id)
        store.close()
        assert state is not None
        if state.state is not JobState.DELIVERED:
            raise SystemExit(f"job not delivered ({state.state.value}); see {workdir / 'worker.log'}")
        distinct = len(set(pacs.sop_instance_uids()))
        if distinct != objects:
            raise SystemExit(f"the PACS holds {distinct} of {objects} objects")
    return {"kills": killed, "cstores": received, "per_object": received / objects, "elapsed_s": elapsed}


def clean_run(objects: int, code: Path | None, workdir: Path) -> float:
    with StoreRecorder("STORESCP") as pacs:
        destination = {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs.port, "timeout": 60}
        job = export_job(workdir, destination, objects)
        started = time.perf_counter()
        worker(job.config_path, job.job_id, code, workdir / "worker.log").wait(timeout=600)
        elapsed = time.perf_counter() - started
        assert len(pacs.received) == objects, f"see {workdir / 'worker.log'}"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=48)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds the PACS takes per C-STORE")
    parser.add_argument("--runs", type=int, default=3, help="crash runs (seeds 0..runs-1)")
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout to compare")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} (1 min); {args.objects} objects, {args.kills} SIGKILLs per run, "
          f"PACS {args.delay * 1000:.0f} ms per C-STORE")  # fmt: skip
    for code in [None, *args.code]:
        label = "this checkout" if code is None else str(code)
        with tempfile.TemporaryDirectory() as tmp:
            clean = clean_run(args.objects, code, Path(tmp) / "clean")
            per_object = []
            for seed in range(args.runs):
                r = crash_run(args.objects, args.kills, args.delay, seed, code, Path(tmp) / f"crash{seed}")
                per_object.append(r["per_object"])
                print(
                    f"  {label}: seed {seed}: {int(r['kills'])} kills, {int(r['cstores'])} C-STOREs for "
                    f"{args.objects} objects = {r['per_object']:.3f} per object ({r['elapsed_s']:.1f} s)"
                )
        mean = sum(per_object) / len(per_object)
        print(
            f"{label}: C-STOREs per object {mean:.3f} (mean of {len(per_object)}, max {max(per_object):.3f}); "
            f"clean export of {args.objects} objects, no PACS delay: {clean:.2f} s with worker start-up"
        )


if __name__ == "__main__":
    main()
