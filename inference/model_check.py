"""``dicom-node model check``: the configured model loads on its backend and generates; optionally the backends agree.

The check runs one grounded report on a synthetic image (a phantom of the demonstration data: no patient data)
through the adapter and the backend exactly as a job does. With ``compare`` the same prepared input also goes
through the ``transformers`` backend and the greedy token ids must be equal (DESIGN invariant 11). A float16
export is compared with transformers in float16; half precision rounds differently in each runtime, so there the
first tokens must be equal and a late difference is reported, not failed.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from inference.config import ModelSettings
from inference.engine import Engine
from inference.types import PreparedInput, Profile, TaskRequest

__all__ = ["check_input", "check_model"]


def check_input(engine: Engine, max_new_tokens: int = 32) -> PreparedInput:
    """One prepared grounded-report request on a synthetic radiograph-like image."""
    from inference.demo.evaluate import model_image
    from inference.demo.phantoms import generate_phantom

    phantom = generate_phantom(np.random.default_rng(2024), kind="radiograph", n_lesions=1)
    item = engine.adapter.prepare(model_image(phantom), TaskRequest(Profile.GROUNDED_REPORT))
    return replace(item, max_new_tokens=max_new_tokens)


def check_model(settings: ModelSettings, compare: bool = False) -> tuple[list[str], bool]:
    """Lines to print, and whether the backends agreed (True when not compared). Raises InferenceError."""
    lines: list[str] = []
    started = time.perf_counter()
    engine = Engine.load(settings)
    identity = engine.identity
    lines.append(
        f"loaded {identity.family} checkpoint {identity.name} (version {identity.version}) on "
        f"{settings.backend}/{settings.device} in {time.perf_counter() - started:.1f} s"
    )
    item = check_input(engine)
    started = time.perf_counter()
    tokens = engine.backend.generate_tokens([item])
    answer = engine.backend.generate([item])[0]
    lines.append(f"generated {tokens.shape[1]} tokens in {time.perf_counter() - started:.2f} s: {answer[:160]!r}")
    if not compare or settings.backend == "transformers":
        return lines, True
    manifest = getattr(engine.backend, "manifest", None)
    precision = manifest.dtype if manifest is not None else "float32"
    reference = Engine.load(settings.model_copy(update={"backend": "transformers", "dtype": precision}))
    expected = reference.backend.generate_tokens([item])
    if expected.shape == tokens.shape and bool((expected == tokens).all()):
        lines.append(f"transformers gives the same {expected.shape[1]} tokens ({precision})")
        return lines, True
    if precision == "float32":
        lines.append(f"transformers gives other tokens: {expected.tolist()} against {tokens.tolist()}")
        return lines, False
    # Half precision rounds differently in each runtime: a late token may differ, an early one should not.
    length = min(expected.shape[1], tokens.shape[1])
    differ = np.flatnonzero(expected[0, :length] != tokens[0, :length])
    first = int(differ[0]) if differ.size else length
    agreed = first >= min(8, length)
    lines.append(
        f"transformers agrees on the first {first} of {expected.shape[1]} tokens ({precision}, which rounds "
        f"differently in each runtime: small late differences are expected)"
        + ("" if agreed else f": {expected.tolist()} against {tokens.tolist()}")
    )
    return lines, agreed
