"""Parsers on verbatim answers in each family's published format, and on what goes wrong with real models."""

from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np
import pytest

from inference.adapters.base import ModelAdapter
from inference.adapters.internvl import InternVLAdapter
from inference.adapters.medgemma import MedGemmaAdapter
from inference.adapters.medrega import MEDREGA_BOX_SPACE, MedRegAAdapter
from inference.adapters.qwen import Qwen3VLAdapter, Qwen25VLAdapter
from inference.config import ModelSettings
from inference.parsing import BoxSpace, parse_json_boxes, parse_ref_box_answer, parse_ref_boxes
from inference.types import ModelImage, PreparedInput, Profile, RegionInput, TaskRequest
from sr_writer.findings import BoundingBox, ImageRef, Language

# A chest radiograph's shape (RG1: 1841 columns x 1955 rows).
COLUMNS, ROWS = 1841, 1955
REF = ImageRef("1.2.826.0.1.3680043.8.498.1", 1)

MEDREGA_GROUNDED = (
    "<ref>right lung</ref><box>[[102, 106, 481, 910]]</box>, <ref>left lung</ref><box>[[535, 128, 923, 889]]</box>: "
    "No focal consolidation, pleural effusion, or pneumothorax is seen. There is no evidence for pulmonary edema. "
    "No radiographic evidence for acute cardiopulmonary process"
)
MEDREGA_DETECTION = "<ref>carotid vessel wall</ref><box>[[365, 293, 416, 598], [596, 316, 635, 464]]</box>"
MEDREGA_CHINESE = (
    "<ref>胰腺癌</ref><box>[[661, 528, 743, 599]]</box>：胰尾部见一稍低密度肿块，约39mm×28mm×36mm，"
    "增强后呈轻度不均匀强化，"
    "强化程度低于正常胰腺考虑恶性肿瘤性病变，胰腺癌可能性大。"
)


def make_item(
    adapter: ModelAdapter,
    profile: Profile = Profile.TEXT_TO_REGION,
    columns: int = COLUMNS,
    rows: int = ROWS,
    language: Language = Language.ENGLISH,
    targets: tuple[str, ...] = (),
    region: RegionInput | None = None,
    modality: str = "CR",
) -> PreparedInput:
    image = ModelImage(pixels=np.zeros((rows, columns, 3), np.uint8), ref=REF, modality=modality)
    request = TaskRequest(profile, language, targets, region, "What is shown?" if profile is Profile.VQA else "")
    return adapter.prepare(image, request)


def adapter_for(cls: type[ModelAdapter], tmp_path: Path) -> ModelAdapter:
    return cls(ModelSettings(family=cls.family, path=tmp_path, trust_remote_code=True))


def expect_box(box: BoundingBox | None, x0: float, y0: float, x1: float, y1: float, tol: float = 1e-6) -> None:
    assert box is not None
    assert box.as_list() == pytest.approx([x0, y0, x1, y1], abs=tol)


# --------------------------------------------------------------------------------------------------------------
# MedRegA
# --------------------------------------------------------------------------------------------------------------
def test_medrega_grounded_report_two_labels_share_the_description(tmp_path: Path) -> None:
    item = make_item(adapter_for(MedRegAAdapter, tmp_path), Profile.GROUNDED_REPORT)
    answer = parse_ref_box_answer(MEDREGA_GROUNDED, item, MEDREGA_BOX_SPACE)
    assert [f.label for f in answer.findings] == ["right lung", "left lung"]
    # pixel = value / 999 x size, relative to the original image
    expect_box(answer.findings[0].box, 102 / 999 * COLUMNS, 106 / 999 * ROWS, 481 / 999 * COLUMNS, 910 / 999 * ROWS)
    expect_box(answer.findings[1].box, 535 / 999 * COLUMNS, 128 / 999 * ROWS, 923 / 999 * COLUMNS, 889 / 999 * ROWS)
    assert all(f.text.startswith("No focal consolidation") for f in answer.findings)
    assert all(f.source == REF for f in answer.findings)
    assert answer.narrative.startswith("right lung, left lung: No focal consolidation")
    assert not answer.problems


def test_medrega_several_boxes_for_one_label_give_one_finding_each(tmp_path: Path) -> None:
    item = make_item(adapter_for(MedRegAAdapter, tmp_path), columns=432, rows=432, modality="MR")
    answer = parse_ref_box_answer(MEDREGA_DETECTION, item, MEDREGA_BOX_SPACE)
    assert [f.label for f in answer.findings] == ["carotid vessel wall"] * 2
    expect_box(answer.findings[1].box, 596 / 999 * 432, 316 / 999 * 432, 635 / 999 * 432, 464 / 999 * 432)


def test_medrega_chinese_answer_with_full_width_colon(tmp_path: Path) -> None:
    item = make_item(
        adapter_for(MedRegAAdapter, tmp_path),
        Profile.GROUNDED_REPORT,
        512,
        512,
        Language.CHINESE,
        ("胰腺癌",),
        modality="CT",
    )
    answer = parse_ref_box_answer(MEDREGA_CHINESE, item, MEDREGA_BOX_SPACE)
    (finding,) = answer.findings
    assert finding.label == "胰腺癌"
    assert finding.language is Language.CHINESE
    assert finding.text.startswith("胰尾部见一稍低密度肿块")  # the colon is not part of the text
    expect_box(finding.box, 661 / 999 * 512, 528 / 999 * 512, 743 / 999 * 512, 599 / 999 * 512)


def test_medrega_truncated_output_keeps_what_is_complete(tmp_path: Path) -> None:
    item = make_item(adapter_for(MedRegAAdapter, tmp_path), Profile.GROUNDED_REPORT)
    answer = parse_ref_box_answer(MEDREGA_GROUNDED[:94], item, MEDREGA_BOX_SPACE)  # cut inside the second box
    assert MEDREGA_GROUNDED[:94].endswith("[[535, 128, 9")
    right, left = answer.findings
    assert right.box is not None and right.label == "right lung"
    assert left.label == "left lung" and left.box is None and left.source is None  # text-only
    assert any("incomplete box" in p for p in answer.problems)


def test_medrega_out_of_range_and_degenerate_boxes_are_dropped(tmp_path: Path) -> None:
    item = make_item(adapter_for(MedRegAAdapter, tmp_path))
    text = (
        "<ref>heart</ref><box>[[300, 400, 1500, 700]]</box>, <ref>aorta</ref><box>[[500, 500, 500, 600]]</box>, "
        "<ref>spine</ref><box>[[480, 0, 520, 1001]]</box>"
    )
    answer = parse_ref_box_answer(text, item, MEDREGA_BOX_SPACE)
    heart, aorta, spine = answer.findings
    assert heart.box is None and aorta.box is None  # text-only, with a reason each
    assert spine.box is not None and spine.box.y1 == pytest.approx(ROWS)  # 1001 is within tolerance: clipped
    assert sum("out of range" in p for p in answer.problems) == 1
    assert sum("no area" in p for p in answer.problems) == 1


def test_medrega_region_to_text_labels_the_asked_region(tmp_path: Path) -> None:
    region = RegionInput(BoundingBox(100, 200, 300, 400), REF)
    item = make_item(
        adapter_for(MedRegAAdapter, tmp_path), Profile.REGION_TO_TEXT, 512, 512, region=region, modality="CT"
    )
    assert "What is <ref>this</ref><box>[[195, 390, 585, 780]]</box> in this CT scan?" in item.prompt.text
    answer = parse_ref_box_answer("right mandible", item, MEDREGA_BOX_SPACE)
    (finding,) = answer.findings
    assert finding.label == "right mandible" and finding.box == region.box and finding.source == REF


# --------------------------------------------------------------------------------------------------------------
# InternVL3 (0..1000)
# --------------------------------------------------------------------------------------------------------------
def test_internvl_boxes_are_on_a_1000_scale(tmp_path: Path) -> None:
    item = make_item(adapter_for(InternVLAdapter, tmp_path), columns=1000, rows=800)
    answer = item and InternVLAdapter.parse(
        adapter_for(InternVLAdapter, tmp_path), "<ref>heart</ref><box>[[400, 500, 700, 800]]</box>", item
    )
    (finding,) = answer.findings
    expect_box(finding.box, 400.0, 400.0, 700.0, 640.0, tol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL: absolute pixels of the resized input
# --------------------------------------------------------------------------------------------------------------
def test_qwen2_5_vl_json_in_a_fence_maps_from_the_resized_input(tmp_path: Path) -> None:
    adapter = adapter_for(Qwen25VLAdapter, tmp_path)
    item = make_item(adapter)
    columns, rows = item.transform.output_size
    assert columns % 28 == 0 and rows % 28 == 0
    text = (
        '```json\n[\n\t{"bbox_2d": [56, 60, 476, 940], "label": "right lung"},\n'
        '\t{"bbox_2d": [520, 70, 900, 930], "label": "left lung"},\n'
        '\t{"bbox_2d": [300, 500, 640, 900], "label": "heart"}\n]\n```'
    )
    answer = adapter.parse(text, item)
    assert [f.label for f in answer.findings] == ["right lung", "left lung", "heart"]
    expect_box(
        answer.findings[0].box, 56 * COLUMNS / columns, 60 * ROWS / rows, 476 * COLUMNS / columns, 940 * ROWS / rows
    )


def test_qwen_truncated_json_is_read_object_by_object(tmp_path: Path) -> None:
    adapter = adapter_for(Qwen25VLAdapter, tmp_path)
    item = make_item(adapter)
    text = '```json\n[{"bbox_2d": [10, 20, 100, 200], "label": "nodule"}, {"bbox_2d": [30, 40'
    answer = adapter.parse(text, item)
    assert [f.label for f in answer.findings] == ["nodule"]
    assert any("malformed or truncated" in p for p in answer.problems)


def test_qwen3_vl_uses_relative_coordinates(tmp_path: Path) -> None:
    adapter = adapter_for(Qwen3VLAdapter, tmp_path)
    item = make_item(adapter, columns=640, rows=480)
    answer = adapter.parse('[{"bbox_2d": [250, 500, 750, 1000], "label": "liver"}]', item)
    expect_box(answer.findings[0].box, 160.0, 240.0, 480.0, 480.0)


def test_qwen_chinese_labels_and_descriptions(tmp_path: Path) -> None:
    adapter = adapter_for(Qwen3VLAdapter, tmp_path)
    item = make_item(adapter, Profile.GROUNDED_REPORT, 640, 480, Language.CHINESE)
    text = (
        '影像诊断：右肺下叶见结节。\n```json\n[{"bbox_2d": [100, 600, 300, 800], "label": "结节", '
        '"description": "右肺下叶结节，约8mm"}]\n```'
    )
    answer = adapter.parse(text, item)
    (finding,) = answer.findings
    assert finding.label == "结节" and finding.text == "右肺下叶结节，约8mm"
    assert finding.language is Language.CHINESE
    assert answer.narrative.startswith("影像诊断：右肺下叶见结节")


# --------------------------------------------------------------------------------------------------------------
# MedGemma: [y0, x0, y1, x1] / 1000 on the square-padded image
# --------------------------------------------------------------------------------------------------------------
def test_medgemma_box_2d_is_y_first_on_the_padded_square(tmp_path: Path) -> None:
    adapter = adapter_for(MedGemmaAdapter, tmp_path)
    item = make_item(adapter, columns=800, rows=400)  # padded to 800 x 800: 200 rows of padding above
    text = (
        'The lungs are clear.\nFinal Answer: ```json\n[{"box_2d": [250, 100, 750, 450], "label": "right lung"},'
        ' {"box_2d": [0, 0, 200, 1000], "label": "in padding"}]\n```'
    )
    answer = adapter.parse(text, item)
    assert [f.label for f in answer.findings] == ["right lung", "in padding"]
    right, padding = answer.findings
    expect_box(right.box, 80.0, 0.0, 360.0, 400.0)  # y 250/1000*800 - 200 = 0 .. 750/1000*800 - 200 = 400
    assert padding.box is None  # lies in the padding only: text-only
    assert any("padding" in p for p in answer.problems)
    assert "The lungs are clear." in answer.narrative


# --------------------------------------------------------------------------------------------------------------
# Garbage never raises
# --------------------------------------------------------------------------------------------------------------
GARBAGE = [
    "",
    "I cannot help with that.",
    "<ref></ref><box></box>",
    "<box>[[1, 2, 3]]</box>",
    "<ref>lung",
    "<ref>lung</ref><box>[[nan, 1, 2, 3]]</box>",
    "<ref>lung</ref><box>[[1e309, 1, 2, 3]]</box>",
    "]]]]<box>[[[[",
    '```json\n{"bbox_2d": "left", "label": 3}\n```',
    '[{"bbox_2d": [1, 2, 3, true]}, 7, null, "x"]',
    '{"box_2d": [1, 2, 3, 4, 5]}',
    "```json\n```",
    "\x00\x01\x02 <ref>\ufffd</ref>",
]


@pytest.mark.parametrize("cls", [MedRegAAdapter, InternVLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, MedGemmaAdapter])
def test_parsers_never_raise_on_garbage(cls: type[ModelAdapter], tmp_path: Path) -> None:
    adapter = adapter_for(cls, tmp_path)
    rng = random.Random(5)
    alphabet = string.printable + '<>[]{}",:：：ref/box_2dbbox'
    samples = [*GARBAGE, *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(200))]
    samples += [MEDREGA_GROUNDED[:n] for n in range(0, len(MEDREGA_GROUNDED), 7)]
    for profile in Profile:
        region = RegionInput(BoundingBox(10, 10, 50, 50), REF) if profile is Profile.REGION_TO_TEXT else None
        item = make_item(adapter, profile, 300, 200, region=region)
        for text in samples:
            answer = adapter.parse(text, item)
            for finding in answer.findings:
                if finding.box is not None:
                    assert 0 <= finding.box.x0 < finding.box.x1 <= 300
                    assert 0 <= finding.box.y0 < finding.box.y1 <= 200


def test_low_level_parsers_accept_non_text() -> None:
    assert parse_ref_boxes(None).problems  # type: ignore[arg-type]
    assert parse_json_boxes(b"[]").problems  # type: ignore[arg-type]


def test_box_space_round_trip_of_region_numbers() -> None:
    from inference.geometry import ImageTransform

    transform = ImageTransform.identity(COLUMNS, ROWS).resize(448, 448)
    space = BoxSpace(scale=999)
    numbers = space.from_source(BoundingBox(184.1, 195.5, 920.5, 977.5), transform)
    assert numbers == (100.0, 100.0, 500.0, 500.0)
