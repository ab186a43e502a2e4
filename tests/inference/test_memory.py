"""The GPU memory check at load: weight bytes from the checkpoint's own safetensors headers, and the refusal that
names both figures. (The check runs on CUDA; its two parts are plain functions, tested here on a real checkpoint.)"""

from __future__ import annotations

import pytest
from safetensors import safe_open

from inference.demo import CHECKPOINT_DIR
from inference.errors import ModelLoadError
from inference.memory import check_fits, weight_bytes


def test_weight_bytes_counts_every_tensor_of_the_checkpoint_at_the_load_dtype() -> None:
    elements = 0
    with safe_open(str(CHECKPOINT_DIR / "model.safetensors"), "pt") as weights:
        for name in weights.keys():
            elements += weights.get_tensor(name).numel()
    assert weight_bytes(CHECKPOINT_DIR, 4) == elements * 4
    assert weight_bytes(CHECKPOINT_DIR, 2) == elements * 2


def test_a_directory_without_safetensors_is_not_estimated(tmp_path: object) -> None:
    assert weight_bytes(tmp_path, 2) is None  # type: ignore[arg-type]


def test_a_model_that_does_not_fit_stops_with_both_figures() -> None:
    gib = 1 << 30
    check_fits(10 * gib, 80 * gib, 80 * gib, "cuda:0", "bfloat16")  # fits
    with pytest.raises(ModelLoadError) as refused:
        check_fits(80 * gib, 60 * gib, 141 * gib, "cuda:1", "bfloat16")
    message = str(refused.value)
    assert "need 80.0 GiB in bfloat16" in message and "cuda:1 has 60.0 GiB free (of 141.0 GiB" in message
