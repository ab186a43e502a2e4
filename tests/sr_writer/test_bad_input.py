"""Bad findings are clipped, dropped to text-only findings, or sanitised as documented; objects stay valid."""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from sr_writer import BoundingBox, Finding, ImageRef, ResultUIDs, build_result_objects, write_result_objects
from sr_writer.context import ResultOptions
from sr_writer.gsps import graphic_label
from sr_writer.render import read_findings
from sr_writer.text import LO_MAX, MAX_UT_CHARS, ST_MAX, multi_line, single_line
from tests.sr_writer.helpers import STUDIES, dciodvfy, have_tool, read, synthetic_result


@pytest.fixture(scope="module")
def source():
    return read("RG3_UNCI.dcm")  # 1760 x 1760


def _bypassed_box(x0: float, y0: float, x1: float, y1: float) -> BoundingBox:
    """A box that skipped the contract's checks (as one decoded by a careless peer could)."""
    box = object.__new__(BoundingBox)
    for name, value in zip(("x0", "y0", "x1", "y1"), (x0, y0, x1, y1), strict=True):
        object.__setattr__(box, name, value)
    return box


def _bad_findings(uid: str) -> list[Finding]:
    return [
        Finding("partly outside", "clip me", box=BoundingBox(-50, 1700, 100, 1900), source=ImageRef(uid)),
        Finding("wholly outside", "drop me", box=BoundingBox(2000, 2000, 2100, 2100), source=ImageRef(uid)),
        Finding("zero area", "drop me", box=_bypassed_box(10, 10, 10, 50), source=ImageRef(uid)),
        Finding("sub-pixel", "drop me", box=BoundingBox(10, 10, 10.2, 50), source=ImageRef(uid)),
        Finding("unknown source", "drop geometry", box=BoundingBox(1, 1, 9, 9), source=ImageRef("1.2.3.4")),
        Finding("bad frame", "drop geometry", box=BoundingBox(1, 1, 9, 9), source=ImageRef(uid, 7)),
        Finding("long", "x" * 2000, box=BoundingBox(100, 100, 200, 200), source=ImageRef(uid)),
        Finding(
            "ctrl\x00\x07 back\\slash\ttab\nline",
            "a\x1bb\\c\r\nsecond\x7f line",
            box=BoundingBox(300, 300, 400, 400),
            source=ImageRef(uid),
        ),
    ]


@pytest.fixture(scope="module")
def bad_objects(source, tmp_path_factory: pytest.TempPathFactory):
    result = synthetic_result(source, STUDIES["RG3"][1], findings=_bad_findings(str(source.SOPInstanceUID)))
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    outdir = tmp_path_factory.mktemp("bad")
    paths = write_result_objects(result, [source], uids, outdir, ResultOptions.all())
    return result, paths


def _sr(paths: list[Path]) -> Path:
    return next(p for p in paths if dcmread(p, stop_before_pixels=True).Modality == "SR")


def test_box_partly_outside_is_clipped(bad_objects):
    _, paths = bad_objects
    f = read_findings(_sr(paths))[0]
    assert f.box == BoundingBox(0, 1700, 100, 1760)


@pytest.mark.parametrize("index", [2, 3, 4, 5, 6])
def test_rejected_geometry_leaves_a_text_only_finding(bad_objects, index: int):
    result, paths = bad_objects
    f = read_findings(_sr(paths))[index - 1]
    assert f.box is None and f.source_sop_instance_uid is None
    assert f.label == result.findings[index - 1].label
    assert f.comment == result.findings[index - 1].text


def test_rejections_are_logged_with_a_reason(source, caplog: pytest.LogCaptureFixture):
    result = synthetic_result(source, STUDIES["RG3"][1], findings=_bad_findings(str(source.SOPInstanceUID)))
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    with caplog.at_level(logging.WARNING, logger="sr_writer"):
        build_result_objects(result, [source], uids, ResultOptions(gsps=False, seg=False))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("finding 1:") and "clipped" in m for m in messages)
    assert any(m.startswith("finding 2:") and "less than" in m for m in messages)
    assert any(m.startswith("finding 3:") and "zero or negative area" in m for m in messages)
    assert any(m.startswith("finding 5:") and "not among" in m for m in messages)
    assert any(m.startswith("finding 6:") and "frame 7" in m for m in messages)
    assert not any("1.2.3.4" in m for m in messages)  # no UIDs of peers in logs


def test_long_sentence_is_kept_in_the_sr_and_shortened_on_images(bad_objects):
    _, paths = bad_objects
    f = read_findings(_sr(paths))[6]
    assert f.comment == "x" * 2000  # UT holds it whole
    gsps = next(dcmread(p) for p in paths if dcmread(p, stop_before_pixels=True).Modality == "PR")
    texts = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.TextObjectSequence]
    assert all(len(t) <= LO_MAX for t in texts)


def test_text_limits():
    assert len(multi_line("y" * 50_000)) == MAX_UT_CHARS
    assert multi_line("y" * 50_000).endswith("...")
    assert len(multi_line("z" * 5000, ST_MAX)) == ST_MAX
    assert single_line("w" * 100) == "w" * 61 + "..."


def test_control_characters_and_backslashes_are_sanitised(bad_objects):
    _, paths = bad_objects
    f = read_findings(_sr(paths))[7]
    assert f.label == "ctrl back/slash tab line"
    assert f.comment == "ab/c\r\nsecond line"
    for path in paths:
        ds = dcmread(path)
        for elem in ds.iterall():
            if elem.VR in ("LO", "SH", "ST", "UT", "LT") and isinstance(elem.value, str):
                assert "\\" not in elem.value, elem
                assert not any(ord(c) < 32 and c not in "\r\n" for c in elem.value), elem


def test_sanitising_keeps_clean_chinese_text_unchanged():
    text = "右下肺见斑片状高密度影，边界模糊。"
    assert single_line(text) == text
    assert multi_line(text + "\n第二行") == text + "\r\n第二行"


@pytest.mark.integration
@pytest.mark.skipif(not have_tool("dciodvfy"), reason="dciodvfy is not installed")
def test_objects_from_bad_input_are_valid(bad_objects):
    _, paths = bad_objects
    assert {p.name: dciodvfy(p).errors for p in paths} == {p.name: [] for p in paths}


def test_label_on_images_has_number_and_score(bad_objects):
    _, paths = bad_objects
    gsps = next(dcmread(p) for p in paths if dcmread(p, stop_before_pixels=True).Modality == "PR")
    objects = [g for a in gsps.GraphicAnnotationSequence for g in a.GraphicObjectSequence]
    assert {g.TrackingID.split(":")[0] for g in objects} == {"F1", "F7", "F8"}
    assert graphic_label.__name__  # the GSPS label format is shared with the SC


def test_source_of_another_study_is_a_caller_error(source):
    other = read("MR2_UNCI.dcm")
    result = synthetic_result(source, STUDIES["RG3"][1])
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    with pytest.raises(ValueError, match="another study"):
        build_result_objects(result, [source, other], uids)
    with pytest.raises(ValueError, match="at least one source"):
        build_result_objects(result, [], uids)


def test_srread_accepts_the_bad_input_report(bad_objects):
    _, paths = bad_objects
    report = hd.sr.srread(_sr(paths)).content
    assert len(report.get_planar_roi_measurement_groups()) == 3
    # The five findings whose geometry was rejected are qualitative evaluations, not region-less groups.
    assert report.get_image_measurement_groups() == []
    assert [f.box is None for f in read_findings(_sr(paths))].count(True) == 5


def test_model_codes_are_checked(source, caplog: pytest.LogCaptureFixture):
    from sr_writer import Code

    uid = str(source.SOPInstanceUID)
    findings = [
        Finding("nodule", "bad code", box=BoundingBox(1, 1, 50, 50), source=ImageRef(uid),
                code=Code("结节", "SCT", "Nodule")),
        Finding("thing", "long meaning", box=BoundingBox(60, 60, 90, 90), source=ImageRef(uid),
                code=Code("123", "99LOCAL", "m" * 100)),
    ]
    result = synthetic_result(source, STUDIES["RG3"][1], findings=findings)
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    with caplog.at_level(logging.WARNING, logger="sr_writer"):
        (sr,) = build_result_objects(result, [source], uids, ResultOptions(gsps=False, seg=False))
    assert any("finding type code dropped" in r.getMessage() for r in caplog.records)
    first, second = read_findings(sr)
    assert first.finding_type is not None and first.finding_type.value == "27925004"  # from the table instead
    assert second.finding_type is not None and len(second.finding_type.meaning) == LO_MAX


def test_an_instance_given_twice_is_used_once(source):
    result = synthetic_result(source, STUDIES["RG3"][1])
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    objects = build_result_objects(result, [source, source], uids, ResultOptions(seg=False))
    assert [ds.Modality for ds in objects] == ["SR", "PR"]


def test_a_source_without_type_2_patient_and_study_attributes_still_gets_valid_results(source, tmp_path: Path):
    """Some real images lack Patient ID, Birth Date or Accession Number altogether (Type 2: present, possibly
    empty); highdicom failed on them with an AttributeError and the job's reason said nothing useful."""
    lacking = read("RG3_UNCI.dcm")
    for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in lacking:
            delattr(lacking, keyword)
    result = synthetic_result(lacking, STUDIES["RG3"][1])
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    paths = write_result_objects(result, [lacking], uids, tmp_path, ResultOptions.all())
    assert "PatientID" not in lacking, "the caller's dataset is not changed"
    kinds = set()
    for path in paths:
        ds = dcmread(path)
        kinds.add(str(ds.Modality))
        assert ds.PatientID == "" and ds.AccessionNumber == ""
        if have_tool("dciodvfy"):
            assert dciodvfy(path).errors == [], path.name
    assert {"SR", "PR", "SEG", "OT"} <= kinds
