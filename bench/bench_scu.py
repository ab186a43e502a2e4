"""C-STORE send rate: N small instances over one association (send_files) against one association per instance.

Both are measured in the same run against the same peer: a real Orthanc on loopback when installed (the PACS
the tests use), else a pynetdicom Storage SCP. The instances are copies of pydicom's CT_small.dcm (39 KB) with
fresh UIDs, the size class of our SR/GSPS results. Prints instances/s for each mode, the ratio, and the
per-association overhead it implies.

    .venv/bin/python -m bench.bench_scu [--count 100] [--repeat 3] [--peer orthanc|pynetdicom]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.config import DestinationSettings
from dicom_node.export.outcome import Outcome
from dicom_node.export.scu import send_files
from tests.orthanc import ORTHANC_BINARY, Orthanc, StoreRecorder


def make_instances(count: int, out: Path) -> list[Path]:
    source = get_testdata_file("CT_small.dcm", download=False)
    if source is None:
        raise SystemExit("pydicom's test file CT_small.dcm is missing")
    ds = pydicom.dcmread(source)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = out / f"{i:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def timed(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    delivered = run()
    elapsed = time.perf_counter() - started
    return delivered / elapsed


def batch(destination: DestinationSettings, files: Sequence[Path]) -> int:
    report = send_files(destination, files, "AINODE")
    assert report.outcome == Outcome.DELIVERED, report.reason
    return len(report.delivered)


def per_file(destination: DestinationSettings, files: Sequence[Path]) -> int:
    delivered = 0
    for path in files:
        report = send_files(destination, [path], "AINODE")
        assert report.outcome == Outcome.DELIVERED, report.reason
        delivered += len(report.delivered)
    return delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peer", choices=["orthanc", "pynetdicom"], default=None)
    parser.add_argument("--orthanc-fsync", action="store_true", help="Orthanc syncs each file (its default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    peer = args.peer or ("orthanc" if ORTHANC_BINARY.exists() else "pynetdicom")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = make_instances(args.count, work)
        size_kb = files[0].stat().st_size // 1024
        server: Orthanc | StoreRecorder
        if peer == "orthanc":
            server = Orthanc(work / "orthanc", sync_storage=args.orthanc_fsync).start()
            destination = DestinationSettings(name="bench", ae_title="ORTHANC", host="127.0.0.1",
                                              port=server.dicom_port)  # fmt: skip
        else:
            server = StoreRecorder("BENCHSCP").start()
            destination = DestinationSettings(name="bench", ae_title="BENCHSCP", host="127.0.0.1", port=server.port)
        try:
            batch(destination, files[:2])  # warm-up: imports, first association
            one: list[float] = []
            many: list[float] = []
            for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both alike
                one.append(timed(lambda: batch(destination, files)))
                many.append(timed(lambda: per_file(destination, files)))
        finally:
            if isinstance(server, Orthanc):
                server.kill()
            else:
                server.stop()

    rate_one, rate_many = statistics.median(one), statistics.median(many)
    overhead_ms = (1 / rate_many - 1 / rate_one) * 1000
    fsync = f", Orthanc fsync {'on' if args.orthanc_fsync else 'off'}" if peer == "orthanc" else ""
    print(f"peer: {peer}{fsync}; {args.count} instances of {size_kb} KB; median of {args.repeat}")
    print(f"one association per batch   : {rate_one:8.1f} instances/s   (runs: {[round(r, 1) for r in one]})")
    print(f"one association per instance: {rate_many:8.1f} instances/s   (runs: {[round(r, 1) for r in many]})")
    print(f"ratio batch / per-instance  : {rate_one / rate_many:8.2f}x")
    print(f"association set-up + release: {overhead_ms:8.1f} ms each (difference of per-instance times)")


if __name__ == "__main__":
    main()
