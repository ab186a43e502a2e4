"""The adapters' model inputs are the ones the family's own transformers processor builds.

The adapters build the inputs themselves (tokenizer + image processor, no multimodal processor) so that no
video processor, hence no torchvision, is needed. Whatever the processor returns and the adapter leaves out or
builds differently reaches the model silently: Qwen-VL without ``mm_token_type_ids`` gets 1-D positions for its
image tokens instead of M-RoPE's 3-D ones, and answers differently. These tests run both paths on the same
images and prompts and compare the inputs, the positions the model derives from them, and what it generates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.adapters.base import HFHandle, read_chat_template
from inference.config import ModelSettings
from inference.engine import Engine
from inference.pixels import load_image
from inference.types import PreparedInput, Profile, TaskRequest
from tests.corpus import corpus_file
from tests.inference.tiny_models import build_qwen2_5_vl_7b_rope

HF_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "internvl", "medgemma"]

#: Processor arguments that a published checkpoint keeps in processor_config.json (the tiny ones have none):
#: image tokens per image (tile) for InternVL and Gemma 3.
PROCESSOR_KWARGS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "internvl": lambda config: {"image_seq_length": int(config.image_seq_length)},
    "medgemma": lambda config: {"image_seq_length": int(config.mm_tokens_per_image)},
}


def family_processor(directory: Path, family: str, model_config: Any) -> Any:
    """The processor class AutoProcessor picks for the checkpoint, built from the checkpoint's own files.

    AutoProcessor itself also builds the video processor, which needs torchvision (not installed here), so the
    class is subclassed to leave the video processor out; images go through the same code either way.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_config.model_type])
    if "video_processor" in inspect.signature(cls.__init__).parameters:

        class ImageOnly(cls):  # type: ignore[valid-type, misc]
            def __init__(self, image_processor: Any, tokenizer: Any, **kwargs: Any) -> None:
                super().__init__(image_processor, tokenizer, None, **kwargs)

        cls = ImageOnly
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.padding_side = "left"
    return cls(
        image_processor=AutoImageProcessor.from_pretrained(directory, local_files_only=True),
        tokenizer=tokenizer,
        chat_template=read_chat_template(directory),
        **PROCESSOR_KWARGS.get(family, lambda _: {})(model_config),
    )


def processor_inputs(processor: Any, engine: Engine, batch: Sequence[PreparedInput]) -> dict[str, Any]:
    """The processor's model inputs for the batch: its chat template on the adapter's messages, its expansion."""
    adapter = engine.adapter
    texts = [processor.apply_chat_template(adapter.hf_messages(item), add_generation_prompt=True) for item in batch]
    images = [[image] for image in adapter.hf_images(batch)]
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


def requests(engine: Engine) -> list[PreparedInput]:
    """Two images of different sizes (so the rows pad differently) with the families' grounding prompts."""
    return [
        engine.adapter.prepare(load_image(corpus_file(name)), TaskRequest(profile, targets=("right lung",)))
        for name, profile in (("RG1_UNCI.dcm", Profile.TEXT_TO_REGION), ("emri_small.dcm", Profile.GROUNDED_REPORT))
    ]


def assert_same_inputs(adapter_inputs: Mapping[str, Any], reference: Mapping[str, Any]) -> None:
    assert sorted(adapter_inputs) == sorted(reference), "the adapter's model inputs differ from the processor's"
    for key, expected in reference.items():
        actual = adapter_inputs[key]
        assert actual.shape == expected.shape, f"{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{key}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{key} differs from the processor's"


def rope_positions(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The M-RoPE position ids the model derives from a batch's inputs (what generate feeds the first step)."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return positions


def load(family: str, directory: Path) -> tuple[Engine, HFHandle]:
    engine = Engine.load(ModelSettings(family=family, path=directory, max_image_side=128, batch_size=2))
    handle: HFHandle = engine.backend.handle  # type: ignore[attr-defined]
    return engine, handle


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_model_inputs_equal_the_family_processors(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    directory = tiny_checkpoint(family)
    engine, handle = load(family, directory)
    batch = requests(engine)
    processor = family_processor(directory, family, handle.model.config)
    reference = processor_inputs(processor, engine, batch)
    encoded = engine.adapter.hf_encode(handle, batch, "cpu")
    assert_same_inputs(encoded, reference)
    if "image_grid_thw" in reference:  # Qwen-VL: the 3-D positions of the image tokens
        assert torch.equal(rope_positions(handle.model, encoded), rope_positions(handle.model, reference))


@pytest.fixture(scope="module")
def qwen_7b_rope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen2_5_vl_7b_rope(tmp_path_factory.mktemp("qwen2_5_vl-7b-rope"))


def test_qwen2_5_vl_at_7b_head_widths_answers_as_through_its_processor(qwen_7b_rope: Path) -> None:
    engine, handle = load("qwen2_5_vl", qwen_7b_rope)
    batch = requests(engine)
    model = handle.model
    reference = processor_inputs(family_processor(qwen_7b_rope, "qwen2_5_vl", model.config), engine, batch)
    encoded = dict(engine.adapter.hf_encode(handle, batch, "cpu"))
    kwargs = {**engine.adapter.hf_generate_kwargs(handle), "max_new_tokens": 4, "do_sample": False}

    def generate(inputs: Mapping[str, Any]) -> Any:
        with torch.no_grad():
            return model.generate(**inputs, **kwargs, output_logits=True, return_dict_in_generate=True)

    # what a user sees first: the same answer as through the processor
    ours, theirs = generate(encoded), generate(reference)
    assert torch.allclose(ours.logits[0], theirs.logits[0], atol=1e-4, rtol=0), (
        f"last-token logits differ by {float((ours.logits[0] - theirs.logits[0]).abs().max()):.4g}"
    )
    assert torch.equal(ours.sequences, theirs.sequences)

    # and why: the same inputs, hence the same positions; the image tokens sit on a 2-D grid, not on the
    # consecutive 1-D positions of text
    assert_same_inputs(encoded, reference)
    positions = rope_positions(model, encoded)
    assert torch.equal(positions, rope_positions(model, reference))
    image = encoded["input_ids"][0] == int(model.config.image_token_id)
    assert positions[1, 0, image].unique().numel() < int(image.sum())
