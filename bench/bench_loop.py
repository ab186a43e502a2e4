"""Node overhead of the whole loop: from a study becoming stable to the last result acknowledged by Orthanc.

For a one-image chest CR and a 100-slice CT, the node (`dicom-node serve`, embedded queue, demo model) receives the
study from Orthanc's routing rule, runs it and sends its SR and GSPS back. From the job store's event times:

    overhead = (delivered - complete) - (succeeded - running)

that is, everything the node adds around the model's own compute: queueing, reading the study, building the result
objects, writing the outbox and the C-STORE back. Baseline, measured in the same run: dcmtk's storescu sending the
same result files to the same Orthanc (the bare cost of delivering them). Prints figures and ratios; exits non-zero
only when a study does not come back.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dicom_node.config import load_settings
from dicom_node.devtools.orthanc import NodeModality, Orthanc
from dicom_node.devtools.receiver import free_port
from dicom_node.jobs.schema import JobState
from dicom_node.jobs.store import JobStore
from tests.conftest import make_study


def _events(store: JobStore, job_id: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in store.job_events(job_id):
        out.setdefault(e["kind"], e["at"])
    return out


def run(workdir: Path, runs: int) -> int:
    port = free_port()
    pacs = Orthanc(workdir / "pacs", node=NodeModality("AINODE", "127.0.0.1", port), stable_age=1)
    config = workdir / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"port": port, "bind": "127.0.0.1", "data_dir": str(workdir / "var")},
                "study": {"stable_seconds": 1},
                "model": {"family": "demo"},
                "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}],
                "rules": [{"name": "all", "outputs": ["sr", "gsps"]}],
            }
        )
    )
    settings = load_settings(config)
    pacs.start()
    node = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
        stdout=(workdir / "serve.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    rows: dict[str, list[tuple[float, float, float]]] = {"CR, 1 image": [], "CT, 100 slices": []}
    failed = 0
    try:
        time.sleep(8)  # workers load the model
        store = JobStore(settings.store_url)
        for i in range(runs):
            studies = {
                "CR, 1 image": make_study(workdir / f"cr{i}", 1, "RG1_UNCI.dcm"),
                "CT, 100 slices": make_study(workdir / f"ct{i}", 100, "693_UNCI.dcm"),
            }
            for name, files in studies.items():
                known = {j.id for j in store.list_jobs()}
                pacs.upload_all(files)
                deadline = time.monotonic() + 300
                job = None
                while time.monotonic() < deadline:
                    new = [j for j in store.list_jobs() if j.id not in known]
                    job = new[0] if new else None
                    if job is not None and job.state.finished:
                        break
                    time.sleep(0.2)
                if job is None or job.state is not JobState.DELIVERED:
                    print(f"{name}: did not come back ({job.state.value if job else 'no job'})")
                    failed += 1
                    continue
                ev = _events(store, job.id)
                total = ev["delivered"] - ev["complete"]
                compute = ev["succeeded"] - ev["running"]
                outbox = [Path(r["path"]) for r in store.job_results(job.id)]
                t0 = time.perf_counter()
                sent = subprocess.run(
                    ["storescu", "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *map(str, outbox)],
                    capture_output=True,
                )
                baseline = time.perf_counter() - t0
                if sent.returncode != 0:
                    failed += 1
                rows[name].append((total - compute, compute, baseline))
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
        pacs.kill()
    print(f"load: {os.getloadavg()}")
    print(f"{'study':<16}{'node overhead':>15}{'model (incl. reading)':>24}{'storescu of results':>22}{'ratio':>8}")
    for name, values in rows.items():
        if not values:
            continue
        overhead = statistics.median(v[0] for v in values)
        compute = statistics.median(v[1] for v in values)
        baseline = statistics.median(v[2] for v in values)
        print(f"{name:<16}{overhead * 1000:>12.0f} ms{compute * 1000:>21.0f} ms{baseline * 1000:>19.0f} ms"
              f"{overhead / baseline:>7.1f}x")
    print("node overhead = (delivered - complete) - (succeeded - running), median of the runs")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        return run(Path(tmp), args.runs)


if __name__ == "__main__":
    sys.exit(main())
