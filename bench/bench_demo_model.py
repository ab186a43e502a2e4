"""CPU latency of the demonstration model per image, against baselines measured in the same run.

    python bench/bench_demo_model.py [--runs 9] [--threads 2]

Figures (median of ``--runs`` runs, batch 1, one phantom image each):

* ``full``: the adapter path from display pixels to findings (prepare, encode, greedy generate, decode, parse),
  grounded report and text-to-region;
* baseline ``vision``: the vision tower and projector forward alone, on the same input;
* baseline ``prefill``: one forward of the whole model over the prompt (no generated token);
* baseline ``random``: the full path with a randomly initialised model of the same configuration, capped at the
  same number of new tokens as the trained model produced (what generation length costs versus compute).

Ratios: full / vision, full / prefill, full / random.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from inference.demo import CHECKPOINT_DIR
from inference.demo.evaluate import held_out, load, model_image, predict
from inference.types import Profile, TaskRequest


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adapter, handle = load(CHECKPOINT_DIR, args.threads)
    phantom = held_out(1, 1, seed=31337)[0]
    image = model_image(phantom)
    report = adapter.prepare(image, TaskRequest(Profile.GROUNDED_REPORT))
    region = adapter.prepare(image, TaskRequest(Profile.TEXT_TO_REGION, targets=("nodule", "opacity")))
    encoded = adapter.hf_encode(handle, [report], "cpu")
    model = handle.model

    full_report = median_seconds(lambda: predict(adapter, handle, [report]), args.runs)
    full_region = median_seconds(lambda: predict(adapter, handle, [region]), args.runs)

    def vision() -> object:
        with torch.inference_mode():
            return model.model.get_image_features(pixel_values=encoded["pixel_values"])

    def prefill() -> object:
        with torch.inference_mode():
            return model(**encoded)

    vision_s = median_seconds(vision, args.runs)
    prefill_s = median_seconds(prefill, args.runs)

    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=report.max_new_tokens, do_sample=False)
    new_tokens = int(out.shape[1] - encoded["input_ids"].shape[1])
    torch.manual_seed(0)
    random_model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(CHECKPOINT_DIR)).eval()
    random_model.generation_config.eos_token_id = None  # run exactly as many steps as the trained model did

    def random_full() -> object:
        with torch.inference_mode():
            return random_model.generate(
                **encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=handle.tokenizer.pad_token_id,
            )

    random_s = median_seconds(random_full, args.runs)

    parameters = sum(p.numel() for p in model.parameters())
    print(f"demo model: {parameters:,} parameters, {encoded['input_ids'].shape[1]} prompt tokens, "
          f"{new_tokens} generated tokens (grounded report), {args.threads} threads, median of {args.runs}")
    print(f"full, grounded report    {full_report * 1000:8.1f} ms/image")
    print(f"full, text-to-region     {full_region * 1000:8.1f} ms/image")
    print(f"baseline vision+proj.    {vision_s * 1000:8.1f} ms/image   full/vision  {full_report / vision_s:6.1f}x")
    print(f"baseline prefill         {prefill_s * 1000:8.1f} ms/image   full/prefill {full_report / prefill_s:6.1f}x")
    print(f"baseline random weights  {random_s * 1000:8.1f} ms/image   full/random  {full_report / random_s:6.2f}x"
          f"   (generate only, {new_tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
