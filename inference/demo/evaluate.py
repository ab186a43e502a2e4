"""Evaluate the demonstration model on held-out phantoms: ``python -m inference.demo.evaluate``.

The held-out phantoms come from a seed the training never uses. Each phantom goes the way a study goes through
the node: DICOM decoded, display pixels, the demo adapter's ``prepare`` (resize and prompt), the transformers
hooks of the adapter (encode, generate, decode), the adapter's parser (boxes back to source pixel space). The
figures: detection recall at IoU 0.5 (a ground-truth lesion counts as found when a predicted box overlaps it with
IoU >= 0.5; with and without requiring the right label), mean IoU (each ground-truth lesion's best IoU, 0 when
missed), precision, for single-lesion and multi-lesion phantoms separately, and CPU time per image (batch 1).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.adapters.base import HFHandle
from inference.adapters.demo import DemoAdapter
from inference.config import ModelSettings
from inference.demo import CHECKPOINT_DIR
from inference.demo.data import display_pixels
from inference.demo.phantoms import Phantom, generate_phantom, read_back
from inference.types import ModelImage, ParsedAnswer, PreparedInput, Profile, TaskRequest
from sr_writer.findings import BoundingBox, ImageRef, Language

__all__ = ["EVAL_SEED", "Scores", "evaluate", "held_out", "load", "main", "predict", "score"]

logger = logging.getLogger(__name__)

#: Seed of the held-out phantoms (training uses inference.demo.train.TRAIN_SEED).
EVAL_SEED = 20261123


def held_out(count: int, n_lesions: int | None, seed: int = EVAL_SEED) -> list[Phantom]:
    """``count`` held-out phantoms with ``n_lesions`` lesions each (``None``: 2 or 3)."""
    rng = np.random.default_rng(seed + (n_lesions if n_lesions is not None else 10))
    return [
        generate_phantom(rng, n_lesions=n_lesions if n_lesions is not None else int(rng.integers(2, 4)))
        for _ in range(count)
    ]


def model_image(phantom: Phantom) -> ModelImage:
    ds = read_back(phantom)
    return ModelImage(
        pixels=display_pixels(ds), ref=ImageRef(str(ds.SOPInstanceUID)), modality=str(ds.Modality),
        study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
    )


def load(directory: Path = CHECKPOINT_DIR, threads: int | None = None) -> tuple[DemoAdapter, HFHandle]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    adapter = DemoAdapter(ModelSettings(family="demo", path=directory))
    handle = adapter.hf_load(adapter.check_checkpoint(), "cpu", torch.float32, "sdpa")
    return adapter, handle


def predict(
    adapter: DemoAdapter, handle: HFHandle, items: Sequence[PreparedInput]
) -> list[ParsedAnswer]:
    """The adapter's transformers path, as the backend runs it, for one batch."""
    import torch

    encoded = adapter.hf_encode(handle, items, "cpu")
    with torch.inference_mode():
        sequences = handle.model.generate(
            **encoded, max_new_tokens=max(i.max_new_tokens for i in items), do_sample=False,
            **adapter.hf_generate_kwargs(handle),
        )
    texts = adapter.hf_decode(handle, sequences, encoded)
    return [adapter.parse(text, item) for text, item in zip(texts, items, strict=True)]


@dataclass(frozen=True)
class Scores:
    lesions: int
    recall: float            # IoU >= 0.5, any label
    recall_labelled: float   # IoU >= 0.5 and the right label
    mean_iou: float
    precision: float         # predicted boxes that match a lesion at IoU >= 0.5

    def line(self, name: str) -> str:
        return (f"{name:<14} lesions {self.lesions:4d}  recall@0.5 {self.recall:.3f}  "
                f"recall@0.5 (label) {self.recall_labelled:.3f}  mean IoU {self.mean_iou:.3f}  "
                f"precision {self.precision:.3f}")


_EN = {"nodule": "nodule", "opacity": "opacity", "结节": "nodule", "阴影": "opacity"}


def score(phantoms: Sequence[Phantom], answers: Sequence[ParsedAnswer]) -> Scores:
    found = found_labelled = predicted = matched = 0
    ious: list[float] = []
    for phantom, answer in zip(phantoms, answers, strict=True):
        boxes: list[tuple[str, BoundingBox]] = [
            (_EN.get(f.label, f.label), f.box) for f in answer.findings if f.box is not None
        ]
        predicted += len(boxes)
        matched += sum(any(b.iou(g.box) >= 0.5 for g in phantom.lesions) for _, b in boxes)
        for lesion in phantom.lesions:
            best = max((b.iou(lesion.box) for _, b in boxes), default=0.0)
            ious.append(best)
            found += best >= 0.5
            found_labelled += any(b.iou(lesion.box) >= 0.5 and label == lesion.label for label, b in boxes)
    total = max(len(ious), 1)
    return Scores(len(ious), found / total, found_labelled / total, float(np.mean(ious)) if ious else 0.0,
                  matched / predicted if predicted else 0.0)


def evaluate(
    adapter: DemoAdapter, handle: HFHandle, phantoms: Sequence[Phantom], language: Language | str = "en",
    batch_size: int = 16,
) -> tuple[Scores, list[ParsedAnswer]]:
    """Grounded reports for ``phantoms`` and their scores."""
    request = TaskRequest(Profile.GROUNDED_REPORT, Language(language))
    answers: list[ParsedAnswer] = []
    for start in range(0, len(phantoms), batch_size):
        chunk = phantoms[start : start + batch_size]
        answers += predict(adapter, handle, [adapter.prepare(model_image(p), request) for p in chunk])
    return score(phantoms, answers), answers


def latency(adapter: DemoAdapter, handle: HFHandle, phantoms: Sequence[Phantom], profile: Profile) -> list[float]:
    """Seconds per image (batch 1) from display pixels to findings, for each phantom."""
    request = TaskRequest(profile, Language.ENGLISH, targets=("nodule",) if profile is Profile.TEXT_TO_REGION else ())
    times = []
    for phantom in phantoms:
        image = model_image(phantom)
        started = time.perf_counter()
        predict(adapter, handle, [adapter.prepare(image, request)])
        times.append(time.perf_counter() - started)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate the demonstration model on held-out phantoms.")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--count", type=int, default=200, help="phantoms per group (single, multi)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    adapter, handle = load(args.checkpoint, args.threads)
    print(f"checkpoint {args.checkpoint} (held-out seed {EVAL_SEED}, {args.count} phantoms per group)")
    results: dict[str, Any] = {}
    for language in ("en", "zh"):
        for name, n in (("single-lesion", 1), ("multi-lesion", None)):
            scores, _ = evaluate(adapter, handle, held_out(args.count, n), language)
            results[f"{name} {language}"] = scores
            print(scores.line(f"{name} {language}"))
        scores, answers = evaluate(adapter, handle, held_out(max(args.count // 4, 10), 0), language)
        false = sum(1 for a in answers if any(f.box is not None for f in a.findings))
        print(f"no-lesion {language}   phantoms {len(answers):4d}  with a (false) box {false}")
    timing = held_out(12, 1, seed=EVAL_SEED + 99)
    latency(adapter, handle, timing[:2], Profile.GROUNDED_REPORT)  # warm-up
    for profile in (Profile.GROUNDED_REPORT, Profile.TEXT_TO_REGION):
        times = latency(adapter, handle, timing, profile)
        print(f"CPU time per image ({profile.value}, batch 1, {args.threads} threads): median "
              f"{statistics.median(times):.3f} s, max {max(times):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
