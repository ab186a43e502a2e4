"""The demonstration model's data: phantoms, texts, tokenizer and processor agree with what inference feeds it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.demo.data import display_pixels, make_example, model_pixels
from inference.demo.phantoms import generate_phantom, iter_phantoms, read_back
from inference.demo.texts import (
    COORD_VALUES,
    answer_grounded_report,
    answer_text_to_region,
    chat_prompt,
    prompt_grounded_report,
    prompt_text_to_region,
    relative_box,
)
from inference.parsing import BoxSpace, parse_ref_boxes, regions_to_findings
from sr_writer.findings import ImageRef


def test_same_seed_same_phantoms_other_seed_other_phantoms() -> None:
    a = [p.to_bytes() for p in iter_phantoms(3, 3)]
    b = [p.to_bytes() for p in iter_phantoms(3, 3)]
    c = [p.to_bytes() for p in iter_phantoms(4, 3)]
    assert a == b
    assert a != c


@pytest.mark.parametrize("kind", ["radiograph", "ct"])
def test_phantom_is_decodable_dicom_with_lesions_inside_the_image(kind: str) -> None:
    rng = np.random.default_rng(11)
    for _ in range(5):
        phantom = generate_phantom(rng, kind=kind, n_lesions=3)
        ds = read_back(phantom)
        assert ds.Modality == ("CR" if kind == "radiograph" else "CT")
        assert ds.pixel_array.shape == (phantom.rows, phantom.columns)
        assert len(phantom.lesions) >= 2
        grey = display_pixels(ds)[:, :, 0].astype(float)
        for lesion in phantom.lesions:
            box = lesion.box
            assert 0 <= box.x0 < box.x1 <= phantom.columns and 0 <= box.y0 < box.y1 <= phantom.rows
            # a lesion is brighter than the lung around it on the display image
            cx, cy = int((box.x0 + box.x1) / 2), int((box.y0 + box.y1) / 2)
            ring = grey[max(int(box.y0) - 3, 0), cx]
            assert grey[cy, cx] > ring
        labels = {s.label for s in phantom.anatomy}
        assert labels == {"right lung", "left lung", "heart"}
        right = next(s for s in phantom.anatomy if s.label == "right lung")
        assert right.box.x1 < phantom.columns / 2 + 5  # patient right is on the image's left


def test_grounded_answer_parses_back_to_the_ground_truth_boxes() -> None:
    phantom = generate_phantom(np.random.default_rng(5), kind="radiograph", n_lesions=2)
    _, transform = model_pixels(display_pixels(read_back(phantom)))
    for language in ("en", "zh"):
        text = answer_grounded_report(phantom, language)
        findings, problems = regions_to_findings(
            parse_ref_boxes(text), BoxSpace(scale=999), transform, ImageRef("1.2.3"), language
        )
        assert problems == []
        assert len(findings) == 2
        for finding, lesion in zip(findings, phantom.lesions, strict=True):
            assert finding.box is not None
            # quantisation to the 8-step grid moves an edge by at most 4/999 of the side
            assert finding.box.iou(lesion.box) > 0.85
            assert finding.text


def test_text_to_region_answer_lists_every_instance_and_absent_targets() -> None:
    phantom = generate_phantom(np.random.default_rng(9), kind="ct", n_lesions=0)
    text = answer_text_to_region(phantom, ["nodule", "heart"], "en")
    assert text.startswith("<ref>nodule</ref>: none, <ref>heart</ref><box>[[")
    assert answer_text_to_region(phantom, ["nodule"], "zh") == "<ref>结节</ref>：未见"


def test_coordinates_are_on_the_grid() -> None:
    phantom = generate_phantom(np.random.default_rng(1), n_lesions=3)
    for lesion in phantom.lesions:
        assert set(relative_box(lesion.box, phantom.columns, phantom.rows)) <= set(COORD_VALUES)


def test_tokenizer_round_trips_every_training_text_without_unknown_pieces() -> None:
    from inference.demo.modeling import build_tokenizer

    tokenizer = build_tokenizer()
    rng = np.random.default_rng(2)
    for _ in range(20):
        phantom = generate_phantom(rng)
        for language in ("en", "zh"):
            for text in (
                chat_prompt(prompt_grounded_report(language)) + answer_grounded_report(phantom, language),
                chat_prompt(prompt_text_to_region(["nodule", "heart"] if language == "en" else ["结节"], language))
                + answer_text_to_region(phantom, ["nodule", "heart"], language),
            ):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert tokenizer.unk_token_id not in ids, text
                assert tokenizer.decode(ids) == text


def test_training_inputs_equal_what_the_processor_builds_at_inference() -> None:
    """The training loop builds ids and pixels itself (fast); they must be what AutoProcessor gives."""
    import torch

    from inference.demo.modeling import build_processor, build_tokenizer
    from inference.demo.train import _pixel_values, encode_pair

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    example = make_example(generate_phantom(np.random.default_rng(3), kind="ct", n_lesions=1))
    prompt = chat_prompt(prompt_grounded_report("en"))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Please locate and describe the lesions."}],
        }
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
    rgb = np.repeat(example.grey[:, :, None], 3, axis=2)
    encoded = processor(text=[prompt], images=[Image.fromarray(rgb)], return_tensors="pt")
    ids, labels = encode_pair(tokenizer, prompt, "No focal lesion.")
    assert encoded["input_ids"][0].tolist() == ids[: encoded["input_ids"].shape[1]]
    assert all(v == -100 for v in labels[: encoded["input_ids"].shape[1]])
    assert torch.allclose(encoded["pixel_values"], _pixel_values([example]), atol=1e-5)
