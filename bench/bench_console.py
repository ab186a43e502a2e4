"""The console's jobs page with 100,000 jobs in the store, against the same page with 1,000 jobs.

Synthetic studies and jobs are inserted in bulk into a SQLite job store (the node's default), the console runs as
the node runs it (uvicorn in a thread, real HTTP on loopback), an admin logs in, and each page is fetched
``--repeat`` times: the first page, a page deep in the list (keyset paging), a state filter, a modality filter and
an accession number search. Prints the median time per page for each store size and the ratio 100,000 / 1,000
(1.0: the page does not slow down as the store grows).

    .venv/bin/python -m bench.bench_console [--jobs 100000] [--baseline 1000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import insert

from dicom_node.config import load_settings
from dicom_node.console.app import ConsoleContext
from dicom_node.console.server import ConsoleServer
from dicom_node.console.users import Role, UserStore
from dicom_node.devtools.receiver import free_port
from dicom_node.jobs.schema import JobState, jobs, studies
from dicom_node.jobs.store import JobStore

STATES = [s.value for s in JobState]
MODALITIES = ["CR", "DX", "CT", "MR", "US"]
PASSWORD = "bench password 1"


def fill(store: JobStore, count: int, chunk: int = 5000) -> None:
    """``count`` complete studies with one job each, created over the last 30 days."""
    rng = random.Random(7)
    now = time.time()
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        stamps = sorted(now - rng.uniform(0, 30 * 86400) for _ in range(n))
        uids = [f"1.2.826.0.1.3680043.10.999.{start + i}" for i in range(n)]
        with store.engine.begin() as conn:
            conn.execute(insert(studies), [
                {"study_uid": u, "state": "complete", "window_started_at": t, "last_received_at": t, "runs": 1,
                 "calling_ae": f"MOD{i % 7}"} for i, (u, t) in enumerate(zip(uids, stamps, strict=True))
            ])
            conn.execute(insert(jobs), [
                {"study_uid": u, "run": 1, "state": rng.choice(STATES), "rule": "all", "profile": "grounded_report",
                 "language": "en", "targets": "[]", "outputs": '["sr","gsps"]', "destinations": '["pacs"]',
                 "attempts": 1, "redeliveries": 0, "created_at": t, "updated_at": t,
                 "modality": rng.choice(MODALITIES), "calling_ae": f"MOD{i % 7}",
                 "accession_number": f"A{start + i:09d}"}
                for i, (u, t) in enumerate(zip(uids, stamps, strict=True))
            ])


def measure(count: int, repeat: int, root: Path) -> dict[str, float]:
    data_dir = root / f"jobs-{count}"
    settings = load_settings(None, {
        "node": {"data_dir": str(data_dir), "http_port": free_port(), "min_free_disk_mb": 0},
        "queue": {"start_workers": False},
    })
    store = JobStore(settings.store_url)
    started = time.perf_counter()
    fill(store, count)
    print(f"  {count:>7} jobs inserted in {time.perf_counter() - started:.1f} s")
    UserStore(store).add("bench", PASSWORD, Role.ADMIN)
    server = ConsoleServer(ConsoleContext(settings, store))
    server.start()
    try:
        client = httpx.Client(base_url=server.url, timeout=30)
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
        assert csrf is not None
        client.post("/login", data={"username": "bench", "password": PASSWORD, "csrf": csrf.group(1)})
        deep = max(1, count - 200)  # a page near the oldest jobs
        pages = {
            "first page": "/jobs",
            "deep page": f"/jobs?before={deep}",
            "state=failed": "/jobs?state=failed",
            "modality=MR": "/jobs?modality=MR",
            "accession": f"/jobs?accession=A{count // 2:09d}",
        }
        medians = {}
        for name, url in pages.items():
            answer = client.get(url)
            assert answer.status_code == 200 and "data-job=" in answer.text, (url, answer.status_code)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                client.get(url).raise_for_status()
                times.append(time.perf_counter() - t0)
            medians[name] = statistics.median(times) * 1000
        return medians
    finally:
        server.stop()
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base = measure(args.baseline, args.repeat, Path(tmp))
        big = measure(args.jobs, args.repeat, Path(tmp))
    print(f"\njobs page, median of {args.repeat} over real HTTP (ms):")
    print(f"{'page':<14} {args.baseline:>10} jobs {args.jobs:>10} jobs   ratio")
    for name in base:
        print(f"{name:<14} {base[name]:>15.1f} {big[name]:>15.1f}   {big[name] / base[name]:.2f}")


if __name__ == "__main__":
    main()
