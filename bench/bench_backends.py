"""The runtimes side by side: transformers against onnxruntime (and tensorrt where NVIDIA TensorRT and a GPU exist).

For each model (the packaged demo checkpoint, and one tiny real-architecture family built offline, Qwen2.5-VL by
default) and each backend, in a fresh process each (so peak memory is the backend's own):

* time to first token: prefill of one image and its prompt, and the first generated token;
* decode tokens/s: generated tokens after the first, per second, batch 1;
* images/s at batch 1 and batch 8: the whole backend call (encode, generate, decode to text) on phantom images
  of different sizes, every answer capped at the same number of new tokens;
* peak resident memory of the process (MB).

The baseline is the ``transformers`` backend measured in the same run; ratios are baseline time / backend time, so
above 1 means faster. Before timing, each backend's tokens are compared with the baseline's (they must be equal).

On a shared machine the load drifts between one backend's measurement and the next, so a last table times batch 8
in alternating rounds (transformers, then each other backend, then transformers again...) in one process, and gives
the median of the per-round ratios: the figure to quote against a goal.

Run: ``.venv/bin/python -m bench.bench_backends [--repeat 3] [--tokens 48] [--family qwen2_5_vl] [--rounds 15]``.
Figures only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _items(adapter: Any, count: int, tokens: int) -> list[Any]:
    from inference.demo.evaluate import model_image
    from inference.demo.phantoms import generate_phantom
    from inference.types import Profile, TaskRequest

    rng = np.random.default_rng(5)
    items = []
    for i in range(count):
        phantom = generate_phantom(rng, kind="radiograph" if i % 2 == 0 else "ct", n_lesions=1)
        item = adapter.prepare(model_image(phantom), TaskRequest(Profile.GROUNDED_REPORT))
        items.append(replace(item, max_new_tokens=tokens))
    return items


def _median_time(call: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_one(
    family: str, path: str | None, backend: str, export_dir: str, repeat: int, tokens: int
) -> dict[str, Any]:
    """Figures of one backend on one model, in this process."""
    import torch

    from inference.config import ModelSettings
    from inference.engine import Engine

    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = ModelSettings(family=family, path=Path(path) if path else None, backend=backend,
                             export_dir=Path(export_dir), device="cuda" if backend == "tensorrt" else "cpu")
    engine = Engine.load(settings)
    items8 = _items(engine.adapter, 8, tokens)
    one = items8[:1]
    engine.backend.generate(one)  # warm-up
    tokens_one = engine.backend.generate_tokens(one)
    tokens_eight = engine.backend.generate_tokens(items8)
    first = [replace(item, max_new_tokens=1) for item in one]
    ttft = _median_time(lambda: engine.backend.generate(first), repeat)
    single = _median_time(lambda: engine.backend.generate(one), repeat)
    eight = _median_time(lambda: engine.backend.generate(items8), repeat)
    generated = int(tokens_one.shape[1])
    return {
        "backend": backend,
        "ttft_ms": ttft * 1000,
        "decode_tok_s": (generated - 1) / max(1e-9, single - ttft) if generated > 1 else float("nan"),
        "images_s_b1": 1 / single,
        "images_s_b8": 8 / eight,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_b1": tokens_one.tolist(),
        "tokens_b8": tokens_eight.tolist(),
        "generated": generated,
    }


def paired_rounds(family: str, path: str | None, export_dir: str, rounds: int, tokens: int,
                  backends: list[str]) -> dict[str, tuple[float, float, float]]:
    """Batch-8 seconds of each backend, in alternating rounds in this process: (median ratio to the first backend,
    lowest and highest round ratio)."""
    from inference.config import ModelSettings
    from inference.engine import Engine

    engines = []
    for backend in backends:
        settings = ModelSettings(family=family, path=Path(path) if path else None, backend=backend,
                                 export_dir=Path(export_dir), device="cuda" if backend == "tensorrt" else "cpu")
        engines.append(Engine.load(settings))
    items = _items(engines[0].adapter, 8, tokens)
    for engine in engines:
        engine.backend.generate(items)  # warm-up
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds):
        for index, engine in enumerate(engines):
            started = time.perf_counter()
            engine.backend.generate(items)
            times[index].append(time.perf_counter() - started)
    figures = {}
    for backend, own in zip(backends[1:], times[1:], strict=True):
        ratios = [base / mine for base, mine in zip(times[0], own, strict=True)]
        figures[backend] = (statistics.median(ratios), min(ratios), max(ratios))
    return figures


def _run_child(
    family: str, path: str | None, backend: str, export_dir: str, repeat: int, tokens: int
) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.bench_backends", "--child", backend, "--model", family,
               "--export-dir", export_dir, "--repeat", str(repeat), "--tokens", str(tokens)]
    if path:
        command += ["--path", path]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        return {"backend": backend, "error": tail}
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def _available_backends() -> list[str]:
    backends = ["transformers", "onnxruntime"]
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            backends.append("tensorrt")
    except (ImportError, OSError):
        pass
    return backends


def _export(family: str, path: str | None, export_dir: str) -> str:
    from inference.config import ModelSettings
    from inference.errors import ModelLoadError
    from inference.export.exporter import export_checkpoint

    settings = ModelSettings(family=family, path=Path(path) if path else None, export_dir=Path(export_dir))
    started = time.perf_counter()
    try:
        export_checkpoint(settings)
    except ModelLoadError as exc:
        return f"not exportable: {exc}"
    return f"exported in {time.perf_counter() - started:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--family", default="qwen2_5_vl", help="tiny family beside the demo model ('' for none)")
    parser.add_argument("--child")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--path")
    parser.add_argument("--export-dir")
    parser.add_argument("--rounds", type=int, default=15, help="alternating batch-8 rounds (0: none)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(args.model, args.path, args.child, args.export_dir, args.repeat, args.tokens)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models: list[tuple[str, str | None]] = [("demo", None)]
        if args.family:
            from tests.inference.tiny_models import BUILDERS

            models.append((args.family, str(BUILDERS[args.family](Path(tmp) / f"tiny-{args.family}"))))
        export_dir = str(Path(tmp) / "exports")
        print(f"{'model':<12} {'backend':<13} {'TTFT ms':>8} {'decode tok/s':>13} {'img/s b1':>9} {'img/s b8':>9} "
              f"{'peak MB':>8}  ratios to transformers (b1, b8); tokens")
        for family, path in models:
            print(f"{family:<12} {_export(family, path, export_dir)}")
            rows = [_run_child(family, path, b, export_dir, args.repeat, args.tokens) for b in _available_backends()]
            base = rows[0]
            for row in rows:
                if "error" in row:
                    print(f"{family:<12} {row['backend']:<13} cannot run: {row['error']}")
                    continue
                same = row["tokens_b1"] == base.get("tokens_b1") and row["tokens_b8"] == base.get("tokens_b8")
                ratio1 = row["images_s_b1"] / base["images_s_b1"] if "images_s_b1" in base else float("nan")
                ratio8 = row["images_s_b8"] / base["images_s_b8"] if "images_s_b8" in base else float("nan")
                print(f"{family:<12} {row['backend']:<13} {row['ttft_ms']:8.1f} {row['decode_tok_s']:13.1f} "
                      f"{row['images_s_b1']:9.2f} {row['images_s_b8']:9.2f} {row['peak_mb']:8.0f}  "
                      f"x{ratio1:.2f}, x{ratio8:.2f}; {row['generated']} tokens, "
                      f"{'equal to transformers' if same else 'DIFFERENT from transformers'}")
        if args.rounds:
            print(f"\nbatch 8 in {args.rounds} alternating rounds, one process: ratio to transformers, median (range)")
            for family, path in models:
                backends = _available_backends()
                for backend, (median, low, high) in paired_rounds(
                        family, path, export_dir, args.rounds, args.tokens, backends).items():
                    print(f"{family:<12} {backend:<13} x{median:.2f} ({low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
