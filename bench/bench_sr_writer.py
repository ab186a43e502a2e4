"""Benchmark: build and write every result object for a study with 20 findings.

Two studies, synthesised from the corpus (no patient data): a 2000 x 2000 CR (RG1_UNCI padded) and a 300-slice
CT (693_UNCI repeated with new UIDs and positions). For each, the time to build and write (to a temporary folder)

* ``default``: SR + GSPS (+ SEG for the 5 findings that carry masks), what the node writes by default;
* ``all``: SR + GSPS + SEG (masks and filled boxes) + burned-in Secondary Capture,

as the median wall and CPU time of several runs after one warm-up run (the first call in a process also loads
highdicom's standard tables; that cold time is printed too). The baseline, measured in the same run, is pydicom's
``dcmwrite`` of the study's own source datasets to the same kind of folder: what merely storing the study costs.
Target: < 1 s per study for ``default``.

Run: ``.venv/bin/python -m bench.bench_sr_writer [--runs N]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from sr_writer import (
    BoundingBox,
    Finding,
    ImageRef,
    InferenceResult,
    Language,
    ResultUIDs,
    result_uid,
    write_result_objects,
)
from sr_writer.context import ResultOptions
from tests.sr_writer.helpers import ellipse_mask, read, synthetic_result, synthetic_series

N_FINDINGS = 20
N_MASKS = 5


def synthetic_cr(size: int = 2000) -> Dataset:
    """RG1_UNCI padded (edge values) to ``size`` x ``size``, with a new SOP Instance UID."""
    ds = read("RG1_UNCI.dcm")
    pixels = ds.pixel_array
    pad_rows, pad_cols = max(0, size - pixels.shape[0]), max(0, size - pixels.shape[1])
    pixels = np.pad(pixels, ((0, pad_rows), (0, pad_cols)), mode="edge")[:size, :size]
    ds.Rows, ds.Columns = size, size
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.SOPInstanceUID = result_uid("bench", "cr", "instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def findings_on(sources: list[Dataset]) -> list[Finding]:
    """20 boxed findings spread over ``sources`` (round robin), the first 5 with elliptic masks."""
    rng = np.random.default_rng(7)
    findings = []
    labels = ["nodule", "mass", "pleural effusion", "odd shadow", "fracture"]
    for i in range(N_FINDINGS):
        ds = sources[(i * max(1, len(sources) // N_FINDINGS)) % len(sources)]
        rows, cols = int(ds.Rows), int(ds.Columns)
        w, h = rng.uniform(0.05, 0.2) * cols, rng.uniform(0.05, 0.2) * rows
        x0, y0 = rng.uniform(0, cols - w), rng.uniform(0, rows - h)
        box = BoundingBox(round(x0), round(y0), round(x0 + w), round(y0 + h))
        findings.append(
            Finding(
                label=labels[i % len(labels)],
                text=f"Finding {i + 1}: a {labels[i % len(labels)]} seen by the model.",
                box=box,
                source=ImageRef(str(ds.SOPInstanceUID)),
                score=float(rng.uniform(0.5, 1.0)),
                mask=ellipse_mask(rows, cols, box) if i < N_MASKS else None,
            )
        )
    return findings


def timed(fn: Callable[[Path], object], runs: int) -> tuple[float, float, float]:
    """(cold first run, median wall time, median CPU time of ``runs`` further runs) in seconds.

    Each run writes into a fresh folder. The CPU time (this process) is what the work costs; the wall time also
    shows how busy the machine was."""
    walls, cpus = [], []
    for _ in range(runs + 1):
        folder = Path(tempfile.mkdtemp(prefix="bench_sr_writer_"))
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(folder)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return walls[0], statistics.median(walls[1:]), statistics.median(cpus[1:])


def bench_study(name: str, sources: list[Dataset], result: InferenceResult, runs: int) -> None:
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)

    def baseline(folder: Path) -> None:
        for ds in sources:
            pydicom.dcmwrite(folder / f"{ds.SOPInstanceUID}.dcm", ds, enforce_file_format=True)

    def ours(options: ResultOptions) -> Callable[[Path], object]:
        return lambda folder: write_result_objects(result, sources, uids, folder, options)

    counts = {}
    for label, options in (("default", ResultOptions()), ("all", ResultOptions.all())):
        with tempfile.TemporaryDirectory() as folder:
            paths = write_result_objects(result, sources, uids, folder, options)
            counts[label] = (len(paths), sum(p.stat().st_size for p in paths))
    base_cold, base, base_cpu = timed(baseline, runs)
    print(f"\n{name}: {len(sources)} source image(s), {len(result.findings)} findings ({N_MASKS} with masks)")
    print(
        f"  baseline  pydicom dcmwrite of the sources      : wall {base * 1000:7.1f} ms, "
        f"cpu {base_cpu * 1000:7.1f} ms (first {base_cold * 1000:.1f})"
    )
    for label, options in (("default", ResultOptions()), ("all", ResultOptions.all())):
        cold, median, cpu = timed(ours(options), runs)
        n, size = counts[label]
        verdict = "meets" if median < 1.0 else "misses"
        print(
            f"  {label:<8}  {n:3d} objects, {size / 1e6:6.1f} MB : wall {median * 1000:7.1f} ms, "
            f"cpu {cpu * 1000:7.1f} ms (first {cold * 1000:.1f}); {median / base:6.2f}x baseline wall; "
            f"{verdict} the 1 s target"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs after the warm-up (median reported)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic CT")
    args = parser.parse_args()

    cr = synthetic_cr()
    bench_study("CR 2000x2000", [cr], synthetic_result(cr, Language.ENGLISH, findings_on([cr])), args.runs)

    ct = synthetic_series(read("693_UNCI.dcm"), args.slices, seed="bench-ct")
    bench_study(f"CT {args.slices} slices", ct, synthetic_result(ct[0], Language.ENGLISH, findings_on(ct)), args.runs)


if __name__ == "__main__":
    main()
