"""Benchmark: the node's memory and time receiving one large instance, spooled as it arrives against held in memory.

A multi-frame CT of ``--mb`` megabytes (512 x 512 x 16-bit frames of the corpus CT ``693_UNCI.dcm``, new UIDs) is
sent once by dcmtk's ``storescu`` to ``dicom-node serve`` (the same node set-up as ``bench_intake``), in two ways:

* ``spooled``: the node as shipped: a data set above 16 MiB is written to the spool while it arrives;
* ``in-memory``: the baseline, pynetdicom's default: the whole data set is held in memory until its last byte,
  then written (the node's patch ``inmemory``, in its subprocess only).

For each it prints the transfer's wall seconds and the node process's peak resident memory (``VmHWM``), the median
of ``--runs`` runs, and the ratios spooled / in-memory. Exit status is non-zero only when the instance did not
arrive whole (storescu failed, or the node holds no record of it), never on a figure.

Run: ``.venv/bin/python -m bench.bench_large_instance [--mb 512] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from bench.bench_intake import NodeReceiver, send

MODES = {"spooled": "", "in-memory": "inmemory"}


def synthesise_large(folder: Path, megabytes: int) -> Path:
    from tests.corpus import corpus_file

    src = pydicom.dcmread(corpus_file("693_UNCI.dcm"))
    frame = src.pixel_array.astype("<i2")
    frames = max(1, megabytes * 1024 * 1024 // frame.nbytes)
    src.PixelData = np.repeat(frame[np.newaxis], frames, axis=0).tobytes()
    src.NumberOfFrames = frames
    src.StudyInstanceUID, src.SeriesInstanceUID = generate_uid(), generate_uid()
    src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "large.dcm"
    src.save_as(path, enforce_file_format=True)
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(mode: str, path: Path, root: Path) -> tuple[float, float, bool]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=root))
    receiver = NodeReceiver(workdir, MODES[mode])
    receiver.start()
    try:
        assert receiver.proc is not None
        seconds, problems = send([path], 1, receiver.aet, receiver.port, workdir)
        peak = peak_rss_mb(receiver.proc.pid)
        ok = not problems and receiver.count() == 1
        if not ok:
            print("\n".join(problems) or f"{mode}: the node holds no record of the instance", file=sys.stderr)
    finally:
        receiver.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return seconds, peak, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the instance's pixel data in MB")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-large-"))
    try:
        path = synthesise_large(root / "data", args.mb)
        size = path.stat().st_size
        print(f"one instance of {size / 1e6:.0f} MB; {args.runs} runs of each, interleaved", flush=True)
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        failed = False
        for run in range(args.runs):
            for mode in MODES:
                seconds, peak, ok = one_run(mode, path, root)
                failed |= not ok
                results[mode].append((seconds, peak))
                print(f"run {run + 1} {mode:<10} {seconds:6.2f} s  {size / 1e6 / seconds:7.1f} MB/s  "
                      f"peak RSS {peak:7.0f} MB  {'ok' if ok else 'FAILED'}", flush=True)
        print(f"\n{'mode':<11}{'median s':>9}{'MB/s':>8}{'peak RSS MB':>13}")
        medians = {}
        for mode, rows in results.items():
            seconds = statistics.median(r[0] for r in rows)
            peak = statistics.median(r[1] for r in rows)
            medians[mode] = (seconds, peak)
            print(f"{mode:<11}{seconds:>9.2f}{size / 1e6 / seconds:>8.1f}{peak:>13.0f}")
        (s_sp, m_sp), (s_mem, m_mem) = medians["spooled"], medians["in-memory"]
        print(f"\nspooled / in-memory: time {s_sp / s_mem:.2f}x, peak memory {m_sp / m_mem:.2f}x")
        return 1 if failed else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
