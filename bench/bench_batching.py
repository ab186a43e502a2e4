"""Studies per minute of one inference worker with 16 small studies waiting at once: batched across studies against
one study at a time, in the same run.

Each study is one synthetic radiograph (a phantom of the demonstration data, no patient data) written as a DICOM
file. "one at a time" runs ``Engine.run_study`` for the 16 studies in a row (the worker before batching:
``inference_concurrency`` 1). "batched" runs the same 16 calls from 16 threads with the batcher on (what an inference
worker's threads do: read and render the study, then share the model's batches; ``model.batch_size`` 8 or 16). The
answers are compared: batched findings must equal the one-at-a-time ones.

Models: the packaged demo model and a tiny random-weight Qwen2.5-VL (tests/inference/tiny_models.py), on the
``transformers`` backend, and the demo model on ``onnxruntime`` when its export can be made.

    .venv/bin/python -m bench.bench_batching [--studies 16] [--tokens 48] [--repeat 3]

Each figure is the median of ``--repeat`` rounds, the two modes alternating.

Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _studies(folder: Path, count: int) -> list[Path]:
    from inference.demo.phantoms import generate_phantom

    rng = np.random.default_rng(16)
    return [generate_phantom(rng, kind="radiograph").save(folder / f"study-{i}.dcm") for i in range(count)]


def _one_at_a_time(engine: Any, files: list[Path]) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    results = [engine.run_study([f], "grounded_report", "en") for f in files]
    return time.perf_counter() - started, results


def _batched(engine: Any, files: list[Path]) -> tuple[float, list[Any], list[int]]:
    sizes: list[int] = []
    engine.start_batching(on_batch=lambda report: sizes.append(report.size))
    results: list[Any] = [None] * len(files)

    def run(i: int) -> None:
        results[i] = engine.run_study([files[i]], "grounded_report", "en")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(files))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert engine.batcher is not None
    engine.batcher.close()
    engine.batcher = None
    return elapsed, results, sizes


def measure(label: str, settings: Any, files: list[Path], repeat: int) -> None:
    """Median of ``repeat`` rounds, the two modes alternating, so that a burst of load elsewhere hits both."""
    import statistics

    from inference.engine import Engine

    engine = Engine.load(settings)
    engine.warm_up()
    alone_times, batched_times = [], []
    same = True
    sizes: list[int] = []
    for _ in range(repeat):
        elapsed, alone = _one_at_a_time(engine, files)
        alone_times.append(elapsed)
        elapsed, together, sizes = _batched(engine, files)
        batched_times.append(elapsed)
        same = same and all(a.findings == b.findings for a, b in zip(alone, together, strict=True))
    alone_s, batched_s = statistics.median(alone_times), statistics.median(batched_times)
    per_minute_alone = len(files) / alone_s * 60
    per_minute_batched = len(files) / batched_s * 60
    print(f"{label:<36} one at a time {per_minute_alone:7.1f} studies/min | batched {per_minute_batched:7.1f} "
          f"studies/min (batches {sizes}) | x{per_minute_batched / per_minute_alone:.2f} | findings "
          f"{'equal' if same else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from inference.config import ModelSettings
    from inference.errors import ModelLoadError
    from inference.export.exporter import export_checkpoint
    from tests.inference.tiny_models import build_qwen2_5_vl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = _studies(folder, args.studies)
        for batch in (8, 16):
            measure(f"demo, transformers, batch {batch}", ModelSettings(family="demo", batch_size=batch), files,
                    args.repeat)
        exports = folder / "exports"
        try:
            export_checkpoint(ModelSettings(family="demo", export_dir=exports))
            measure("demo, onnxruntime, batch 16",
                    ModelSettings(family="demo", backend="onnxruntime", export_dir=exports, batch_size=16), files,
                    args.repeat)
        except ModelLoadError as exc:
            print(f"demo, onnxruntime: not measured ({exc})")
        qwen = build_qwen2_5_vl(folder / "tiny-qwen2_5_vl")
        measure("tiny qwen2_5_vl, transformers, batch 16",
                ModelSettings(family="qwen2_5_vl", path=qwen, batch_size=16, max_new_tokens=args.tokens), files,
                args.repeat)


if __name__ == "__main__":
    main()
