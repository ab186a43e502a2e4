"""Will the model fit? Weight bytes read from the checkpoint's safetensors headers, against a device's free memory.

Checked when a worker loads its model on CUDA, before any weight is read, so that a model too large for the GPU
stops the worker with both figures instead of an out-of-memory error half-way through loading.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from inference.errors import ModelLoadError

__all__ = ["HEADROOM", "check_fits", "weight_bytes"]

#: Bytes per element of the safetensors dtypes.
_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
          "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "F16", "BF16"}
#: Share of the free memory the weights may take: the rest is for activations, the KV cache and CUDA's own needs.
HEADROOM = 0.9


def weight_bytes(directory: Path, dtype_bytes: int) -> int | None:
    """The weights' size once loaded with floating-point tensors of ``dtype_bytes`` bytes; None without safetensors."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            kind = entry["dtype"]
            total += count * (dtype_bytes if kind in _FLOATS else _SIZES.get(kind, 4))
    return total


def check_fits(needed: int, free: int, total: int, device: str, dtype: str) -> None:
    """:class:`ModelLoadError` naming both figures when ``needed`` bytes of weights do not fit in ``free``."""
    if needed <= free * HEADROOM:
        return
    gib = 1 << 30
    raise ModelLoadError(
        f"the model's weights need {needed / gib:.1f} GiB in {dtype}, but {device} has {free / gib:.1f} GiB free "
        f"(of {total / gib:.1f} GiB; at most {HEADROOM:.0%} of the free memory goes to weights): use a GPU with more "
        "free memory (--device cuda:N), stop what else runs on it, or a smaller or quantised checkpoint"
    )
