"""GPU script: the real-size Qwen2.5-VL-7B architecture (random bf16 weights) on one NVIDIA GPU, per runtime path.

Run wherever an NVIDIA GPU is available (it takes under 8 minutes on one H100/H200-class GPU and needs ~20 GB of
GPU memory); nothing is downloaded: the architecture is built from its configuration, the weights are random, the
inputs are synthetic (a 1036 x 1036 image, 1369 image tokens, after Qwen's resize of a 1024 x 1024 image).

Paths measured:
* ``eager``: transformers, dynamic KV cache, SDPA attention, bf16 (the node's transformers backend);
* ``static+compile``: transformers with a static KV cache and ``torch.compile(mode="reduce-overhead")`` (CUDA
  graphs), the option of the transformers backend;
* ``onnxruntime-cuda`` / ``tensorrt``: printed as skipped with the reason when onnxruntime-gpu or TensorRT is not
  installed there (exporting a 7B checkpoint is a site's one-off job: ``dicom-node model export``).

Figures: time to first token for one image (prefill), decode ms/token at batch 1, 8 and 16, and the ratio of the
decode time to the memory-bandwidth floor: every decode step reads all weights once, so a step cannot take less
than weight bytes / HBM bandwidth; the bandwidth is measured in the same run with a device-to-device copy.

    python -m bench.gpu_runtime [--tokens 64] [--batches 1,8,16] [--skip-compile]
    python -m bench.gpu_runtime --tiny      # the same code on a tiny configuration, on the CPU (a smoke run)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Qwen2.5-VL-7B-Instruct's published architecture (config.json of the checkpoint).
QWEN25_VL_7B: dict[str, Any] = {
    "text": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tokens": {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
               "vision_end_token_id": 151653},
}
TINY: dict[str, Any] = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 4096,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}},
    "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [1]},
    "tokens": {"image_token_id": 990, "video_token_id": 991, "vision_start_token_id": 992, "vision_end_token_id": 993},
}


def build_model(arch: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(text_config=arch["text"], vision_config=arch["vision"], **arch["tokens"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    return model.eval()


def synthetic_inputs(arch: dict[str, Any], batch: int, side: int, device: str, dtype: Any) -> dict[str, Any]:
    """``batch`` prompts of one ``side`` x ``side`` image each (side a multiple of 28) and 40 text tokens."""
    import torch

    vision, tokens = arch["vision"], arch["tokens"]
    grid = side // vision["patch_size"]
    merged = (grid // vision["spatial_merge_size"]) ** 2
    patch_values = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    text = torch.randint(10, 900, (40,))
    row = torch.cat([text[:20], torch.tensor([tokens["vision_start_token_id"]]),
                     torch.full((merged,), tokens["image_token_id"]), torch.tensor([tokens["vision_end_token_id"]]),
                     text[20:]])
    ids = row[None].repeat(batch, 1).to(device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == tokens["image_token_id"]).long(),
        "pixel_values": torch.randn(batch * grid * grid, patch_values, device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
    }


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _generate_seconds(model: Any, inputs: dict[str, Any], new_tokens: int, device: str, **kwargs: Any) -> float:
    import torch

    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    _sync(device)
    return time.perf_counter() - started


def bandwidth_gb_s(device: str) -> float:
    """Device memory bandwidth from a 2 GiB device-to-device copy (bytes read + written per second)."""
    import torch

    if not device.startswith("cuda"):
        return float("nan")
    source = torch.empty(1 << 30, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 10 * 2 * source.numel() * 2 / (time.perf_counter() - started) / 1e9


def measure(model: Any, arch: dict[str, Any], label: str, args: argparse.Namespace, floor_ms: float,
            **kwargs: Any) -> None:
    import torch

    side = args.side
    one = synthetic_inputs(arch, 1, side, args.device, model.dtype)
    _generate_seconds(model, one, 2, args.device, **kwargs)  # warm-up (and compilation for static+compile)
    ttft = min(_generate_seconds(model, one, 1, args.device, **kwargs) for _ in range(2))
    print(f"{label:<16} TTFT (1 image {side}x{side}, {int(one['input_ids'].shape[1])} tokens): {ttft * 1000:8.1f} ms")
    for batch in args.batches:
        inputs = synthetic_inputs(arch, batch, side, args.device, model.dtype)
        try:
            first = _generate_seconds(model, inputs, 1, args.device, **kwargs)
            full = _generate_seconds(model, inputs, args.tokens, args.device, **kwargs)
        except torch.OutOfMemoryError:
            print(f"{label:<16} batch {batch:>2}: out of GPU memory")
            torch.cuda.empty_cache()
            continue
        per_token = (full - first) / (args.tokens - 1) * 1000
        ratio = f"{per_token / floor_ms:.2f}x the bandwidth floor" if floor_ms == floor_ms else "no floor on CPU"
        print(f"{label:<16} batch {batch:>2}: decode {per_token:7.2f} ms/token ({batch * 1000 / per_token:8.1f} "
              f"tokens/s), {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--side", type=int, default=1036, help="image side after Qwen's resize (multiple of 28)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny configuration on the CPU: checks the script runs")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    import torch

    started = time.perf_counter()
    if args.tiny:
        arch, args.device, dtype = TINY, "cpu", torch.float32
        args.side, args.tokens = 112, min(args.tokens, 8)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: this script measures a GPU (use --tiny for a CPU smoke run)")
            return
        arch, args.device, dtype = QWEN25_VL_7B, "cuda", torch.bfloat16
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    model = build_model(arch, args.device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = bandwidth_gb_s(args.device)
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1000 if bandwidth == bandwidth else float("nan")
    print(f"weights {weight_bytes / 1e9:.2f} GB ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)"
          f", measured bandwidth {bandwidth:.0f} GB/s, decode floor {floor_ms:.2f} ms/token; built in "
          f"{time.perf_counter() - started:.0f} s")
    measure(model, arch, "eager", args, floor_ms)
    if args.skip_compile or args.tiny:
        print("static+compile   skipped" + (" (--tiny: CUDA graphs need a GPU)" if args.tiny else ""))
    else:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        measure(model, arch, "static+compile", args, floor_ms)
    try:
        import onnxruntime

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        cuda = False
    print("onnxruntime-cuda " + ("available: run `dicom-node model export` of a 7B checkpoint and bench_backends"
                                 if cuda else "skipped: onnxruntime-gpu is not installed here"))
    try:
        import tensorrt

        print(f"tensorrt         TensorRT {tensorrt.__version__} available: the tensorrt backend builds engines from "
              "an export")
    except (ImportError, OSError) as exc:
        print(f"tensorrt         skipped: {exc}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
