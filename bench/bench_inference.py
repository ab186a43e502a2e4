"""Benchmark of the inference library on CPU: preprocessing throughput and tiny-model generate latency.

Preprocessing: images/s of the full DICOM -> display-ready RGB pipeline (read, decode, Modality LUT, VOI, MONOCHROME1,
RGB) and of that plus the MedRegA geometry (448 x 448), for the CR, CT and MR images of the corpus; baseline:
``pydicom.dcmread(path).pixel_array`` alone, measured in the same run (ratio = pipeline time / baseline time).

Generate: for each Hugging Face family, a tiny random-weight checkpoint built offline (tests/inference/tiny_models.py)
runs the full path (prepare, encode, generate, decode, parse) for one image; baseline: ``model.generate`` alone on
the same, already encoded inputs with the same number of new tokens (ratio = full path / bare generate).

Run: ``.venv/bin/python bench/bench_inference.py [--repeat 5] [--tokens 16]``. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from inference.adapters.medrega import MedRegAAdapter  # noqa: E402
from inference.config import ModelSettings  # noqa: E402
from inference.pixels import load_image  # noqa: E402
from inference.types import ModelImage, Profile, TaskRequest  # noqa: E402
from tests.corpus import corpus_file  # noqa: E402

GROUPS = {
    "CR": ["RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm", "RG3_J2KR.dcm"],
    "CT": ["693_UNCI.dcm", "693_J2KR.dcm", "CT_small.dcm"],
    "MR": ["MR2_UNCI.dcm", "MR2_J2KR.dcm", "MR_small.dcm", "emri_small.dcm"],
}


def best_of(repeat: int, func: Callable[[], object]) -> float:
    """The median wall time of ``repeat`` calls (after one untimed call)."""
    func()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_preprocessing(repeat: int) -> None:
    from pydicom.data import get_testdata_file

    adapter = MedRegAAdapter(ModelSettings(family="medrega", path=Path(tempfile.gettempdir()), trust_remote_code=True))
    request = TaskRequest(Profile.GROUNDED_REPORT)
    print("Preprocessing (CPU, one image per call; multi-frame: first frame)")
    print(
        f"{'group':5} {'images':>6} {'baseline img/s':>15} {'pipeline img/s':>15} {'ratio':>6} "
        f"{'+448 img/s':>11} {'ratio':>6}"
    )
    for group, names in GROUPS.items():
        paths = []
        for name in names:
            found = get_testdata_file(name, download=False)
            paths.append(Path(found) if found else corpus_file(name))

        def baseline(paths: list[Path] = paths) -> None:
            for path in paths:
                ds = pydicom.dcmread(path)
                _ = (
                    ds.pixel_array
                    if int(ds.get("NumberOfFrames", 1) or 1) == 1
                    else pydicom.pixels.pixel_array(ds, index=0)
                )

        def pipeline(paths: list[Path] = paths) -> None:
            for path in paths:
                load_image(path)

        def with_model_geometry(paths: list[Path] = paths) -> None:
            for path in paths:
                adapter.prepare(load_image(path), request)

        t_base, t_pipe, t_geom = (best_of(repeat, f) for f in (baseline, pipeline, with_model_geometry))
        n = len(paths)
        print(
            f"{group:5} {n:6d} {n / t_base:15.1f} {n / t_pipe:15.1f} {t_pipe / t_base:6.2f} "
            f"{n / t_geom:11.1f} {t_geom / t_base:6.2f}"
        )


def time_engine(engine: Any, image: ModelImage, repeat: int, tokens: int) -> tuple[float, float, float]:
    """(bare model.generate, full path for one image, full path for a batch of two), in seconds."""
    import torch

    adapter, backend = engine.adapter, engine.backend
    handle = backend.handle
    item = adapter.prepare(image, TaskRequest(Profile.TEXT_TO_REGION))
    encoded = adapter.hf_encode(handle, [item], "cpu")
    kwargs = adapter.hf_generate_kwargs(handle)

    def bare() -> None:
        with torch.inference_mode():
            handle.model.generate(**encoded, max_new_tokens=tokens, do_sample=False, **kwargs)

    def full() -> None:
        prepared = adapter.prepare(image, TaskRequest(Profile.TEXT_TO_REGION))
        (text,) = backend.generate([prepared])
        adapter.parse(text, prepared)

    def batch_of_two() -> None:
        prepared = adapter.prepare(image, TaskRequest(Profile.TEXT_TO_REGION))
        backend.generate([prepared, prepared])

    return best_of(repeat, bare), best_of(repeat, full), best_of(repeat, batch_of_two)


def bench_generate(repeat: int, tokens: int) -> None:
    import torch

    from inference.engine import Engine
    from tests.inference.tiny_models import BUILDERS

    torch.manual_seed(0)
    image = load_image(corpus_file("RG1_UNCI.dcm"))
    print(
        f"\nGenerate, tiny random-weight checkpoints on CPU ({torch.get_num_threads()} threads), one chest CR, "
        f"{tokens} new tokens, greedy"
    )
    print(
        f"{'family':11} {'load s':>7} {'bare generate ms':>17} {'full path ms':>13} {'ratio':>6} {'batch of 2 ms':>14}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for family, build in BUILDERS.items():
            directory = Path(tmp) / family
            directory.mkdir()
            build(directory)
            started = time.perf_counter()
            engine = Engine.load(
                ModelSettings(family=family, path=directory, max_new_tokens=tokens, max_image_side=128)
            )
            load_s = time.perf_counter() - started
            engine.warm_up()
            t_bare, t_full, t_two = time_engine(engine, image, repeat, tokens)
            print(
                f"{family:11} {load_s:7.2f} {t_bare * 1e3:17.1f} {t_full * 1e3:13.1f} {t_full / t_bare:6.2f} "
                f"{t_two * 1e3:14.1f}"
            )
    print("(full path: prepare + encode + generate + decode + parse; both stop at the same greedy tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions per figure (median reported)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per generation")
    parser.add_argument("--skip-generate", action="store_true", help="preprocessing figures only")
    args = parser.parse_args()
    bench_preprocessing(args.repeat)
    if not args.skip_generate:
        bench_generate(args.repeat, args.tokens)


if __name__ == "__main__":
    main()
