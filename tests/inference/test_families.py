"""Each family end to end on CPU with a tiny random-weight checkpoint built offline in the test.

The same code runs as in production: registry -> adapter -> transformers backend (offline, local files) ->
generate -> decode -> parse -> findings in source pixel space. To check decoding and parsing of a real generation,
one test per family forces the tokens of a known answer with a logits processor (a random model otherwise says
nothing parseable); everything else is the unmodified path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from inference.adapters.base import HFHandle, checkpoint_fingerprint
from inference.config import ModelSettings
from inference.engine import Engine
from inference.geometry import ImageTransform
from inference.pixels import load_image
from inference.registry import adapter_class
from inference.types import PreparedInput, Profile, TaskRequest
from sr_writer.findings import BoundingBox, Language
from tests.corpus import corpus_file

HF_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "internvl", "medgemma"]

#: A known answer per family, written as the word-level tiny tokenizer decodes it, and where its first box lies
#: in the family's own numbers (x0, y0, x1, y1).
ANSWERS: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "qwen2_5_vl": ('```json [ { "bbox_2d": [ 10 , 20 , 60 , 90 ] , "label": "right lung" } ] ```', (10, 20, 60, 90)),
    "qwen3_vl": ('[ { "bbox_2d": [ 100 , 200 , 400 , 900 ] , "label": "right lung" } ]', (100, 200, 400, 900)),
    "internvl": ("<ref> right lung </ref> <box> [[ 100 , 200 , 400 , 900 ]] </box>", (100, 200, 400, 900)),
    "medgemma": (
        'Final Answer: ```json [ { "box_2d": [ 200 , 100 , 900 , 400 ] , "label": "right lung" } ] ```',
        (100, 200, 400, 900),
    ),
}


def settings(family: str, path: Path, **extra: Any) -> ModelSettings:
    values: dict[str, Any] = {"max_new_tokens": 6, "max_image_side": 128, "batch_size": 2, **extra}
    return ModelSettings(family=family, path=path, **values)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Callable[[str], Path]) -> dict[str, Engine]:
    return {family: Engine.load(settings(family, tiny_checkpoint(family))) for family in HF_FAMILIES}


def cr_item(engine: Engine, profile: Profile = Profile.TEXT_TO_REGION) -> PreparedInput:
    image = load_image(corpus_file("RG1_UNCI.dcm"))
    return engine.adapter.prepare(image, TaskRequest(profile, targets=("right lung",)))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_engine_loads_offline_with_identity(
    family: str, engines: dict[str, Engine], tiny_checkpoint: Callable[[str], Path]
) -> None:
    engine = engines[family]
    assert engine.identity.family == family
    assert engine.identity.version == checkpoint_fingerprint(tiny_checkpoint(family))
    assert engine.identity.parameters["dtype"] == "float32"  # auto on CPU
    assert engine.identity.parameters["attention"] == "sdpa"
    assert engine.backend.describe()["decoding"] == "greedy"


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_inputs_hold_the_image_tokens_the_model_expects(family: str, engines: dict[str, Engine]) -> None:
    engine = engines[family]
    handle: HFHandle = engine.backend.handle  # type: ignore[attr-defined]
    item = cr_item(engine)
    encoded = engine.adapter.hf_encode(handle, [item, item], "cpu")
    ids = encoded["input_ids"]
    assert ids.shape[0] == 2 and encoded["attention_mask"].shape == ids.shape
    config = handle.model.config
    image_token = int(getattr(config, "image_token_id", getattr(config, "image_token_index", -1)))
    per_row = (ids == image_token).sum(dim=1)
    assert per_row[0] == per_row[1] > 0
    if family in ("qwen2_5_vl", "qwen3_vl"):
        grid = encoded["image_grid_thw"][0]
        assert int(per_row[0]) == int(grid.prod()) // 4
        # the processor's own resize is the identity: the model sees exactly the recorded geometry
        patch = 14 if family == "qwen2_5_vl" else 16
        assert (int(grid[2]) * patch, int(grid[1]) * patch) == item.transform.output_size
    elif family == "internvl":
        assert int(per_row[0]) == int(config.image_seq_length) * encoded["pixel_values"].shape[0] // 2
    else:
        assert int(per_row[0]) == int(config.mm_tokens_per_image)
        assert encoded["token_type_ids"].sum() == 2 * config.mm_tokens_per_image
        assert item.transform.output_size == (56, 56)  # squared then resized to the processor's side
    assert "right lung" in engine.adapter.hf_render(handle, item)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_generate_runs_batched_and_answers_parse(family: str, engines: dict[str, Engine]) -> None:
    engine = engines[family]
    items = [cr_item(engine, profile) for profile in (Profile.GROUNDED_REPORT, Profile.TEXT_TO_REGION)]
    texts = engine.backend.generate(items)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    for text, item in zip(texts, items, strict=True):
        answer = engine.adapter.parse(text, item)
        for finding in answer.findings:
            if finding.box is not None:
                assert finding.box.x1 <= item.image.columns and finding.box.y1 <= item.image.rows


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_run_study_on_real_images(family: str, engines: dict[str, Engine]) -> None:
    engine = engines[family]
    files = [corpus_file("RG1_UNCI.dcm"), corpus_file("emri_small.dcm")]
    result = engine.run_study(files, "grounded_report", language="zh", targets=["右肺"])
    assert result.profile == "grounded_report" and result.language is Language.CHINESE
    assert result.algorithm == engine.identity
    assert result.study_instance_uid  # from the files
    sources = {f.source.sop_instance_uid for f in result.findings if f.source is not None}
    assert sources <= {load_image(p).ref.sop_instance_uid for p in files}


class ForceAnswer(LogitsProcessor):
    """Makes greedy decoding produce ``ids`` then ``eos``."""

    def __init__(self, ids: list[int], eos: int) -> None:
        self.ids, self.eos, self.start = ids, eos, -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start < 0:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        target = self.ids[step] if step < len(self.ids) else self.eos
        forced = torch.full_like(scores, float("-inf"))
        forced[:, target] = 0.0
        return forced  # type: ignore[return-value]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_a_generated_grounded_answer_lands_on_source_pixels(
    family: str, tiny_checkpoint: Callable[[str], Path]
) -> None:
    text, numbers = ANSWERS[family]
    base = adapter_class(family)

    class Forced(base):  # type: ignore[valid-type, misc]
        def hf_generate_kwargs(self, handle: HFHandle) -> dict[str, Any]:
            kwargs = super().hf_generate_kwargs(handle)
            ids = handle.tokenizer(text, add_special_tokens=False)["input_ids"]
            assert handle.tokenizer.unk_token_id not in ids, "the tiny vocabulary lacks a word of the answer"
            kwargs["logits_processor"] = [ForceAnswer(ids, handle.tokenizer.eos_token_id)]
            return kwargs

    model_settings = settings(family, tiny_checkpoint(family), max_new_tokens=64)
    adapter = Forced(model_settings)
    backend = engine_backend(adapter, model_settings)
    item = adapter.prepare(load_image(corpus_file("RG1_UNCI.dcm")), TaskRequest(Profile.TEXT_TO_REGION))
    (answer_text,) = backend.generate([item])
    answer = adapter.parse(answer_text, item)
    (finding,) = answer.findings
    assert finding.label == "right lung"
    expected = expected_source_box(adapter.box_space.scale, numbers, item.transform)
    assert finding.box is not None and np.allclose(finding.box.as_list(), expected.as_list(), atol=1e-6)


def engine_backend(adapter: Any, model_settings: ModelSettings) -> Any:
    from inference.backends.hf import TransformersBackend

    backend = TransformersBackend(adapter, model_settings, "cpu")
    backend.load()
    return backend


def expected_source_box(
    scale: float | None, numbers: tuple[float, float, float, float], transform: ImageTransform
) -> BoundingBox:
    columns, rows = transform.output_size
    x0, y0, x1, y1 = numbers
    if scale is not None:
        x0, x1, y0, y1 = x0 / scale * columns, x1 / scale * columns, y0 / scale * rows, y1 / scale * rows
    box = transform.box_to_source(BoundingBox(x0, y0, x1, y1))
    assert box is not None
    return box
