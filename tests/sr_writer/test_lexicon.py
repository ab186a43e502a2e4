"""Model labels are coded from the table; labels outside it stay uncoded."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from sr_writer.findings import Language
from sr_writer.lexicon import finding_site_for, finding_type_for, laterality_for, localized
from sr_writer.text import ascii_code_string


@pytest.mark.parametrize(
    ("label", "value"),
    [
        ("nodule", codes.SCT.Nodule.value),
        ("Left lung nodule", codes.SCT.Nodule.value),
        ("左肺结节", codes.SCT.Nodule.value),
        ("Pleural effusion, right", codes.SCT.PleuralEffusion.value),
        ("右侧胸腔积液", codes.SCT.PleuralEffusion.value),
        ("PNEUMOTHORAX", codes.SCT.Pneumothorax.value),
        ("rib fracture", "125605004"),
    ],
)
def test_common_findings_are_coded(label: str, value: str):
    code = finding_type_for(label)
    assert code is not None and code.value == value and code.scheme_designator == "SCT"


@pytest.mark.parametrize("label", ["odd shadow", "massive", "something", "阴影"])
def test_unknown_labels_stay_uncoded(label: str):
    assert finding_type_for(label) is None


def test_sites_are_found_in_labels():
    lung = finding_site_for("left lung nodule")
    assert lung is not None and lung.value == codes.SCT.Lung.value
    assert finding_site_for("左肺结节") == lung
    assert finding_site_for("nodule") is None


def test_code_strings_are_ascii_upper_case():
    assert ascii_code_string("AI Med-VLM 4b") == "AI_MED_VLM_4B"
    assert ascii_code_string("医学模型") == "AI"
    assert len(ascii_code_string("x" * 40)) == 16


@pytest.mark.parametrize(
    ("text", "meaning"),
    [
        ("left lung nodule", "Left"),
        ("Pleural effusion, right", "Right"),
        ("左肺结节", "Left"),
        ("右侧胸腔积液", "Right"),
        ("bilateral effusions", "Bilateral"),
        ("双肺结节", "Bilateral"),
        ("nodules in the left and right lung", "Bilateral"),
    ],
)
def test_laterality_is_read_from_english_and_chinese_words(text: str, meaning: str):
    side = laterality_for(text)
    assert side is not None and side.meaning == meaning and side.scheme_designator == "SCT"


@pytest.mark.parametrize("text", ["nodule", "lung mass", "leftover shadow", "肺结节"])
def test_no_side_named_no_laterality(text: str):
    assert laterality_for(text) is None


def test_chinese_reports_get_chinese_meanings_with_the_same_code():
    lung = finding_site_for("lung")
    assert lung is not None
    chinese = localized(lung, Language.CHINESE)
    assert (chinese.value, chinese.scheme_designator, chinese.meaning) == (lung.value, lung.scheme_designator, "肺")
    assert localized(lung, Language.ENGLISH) == lung
