"""The SR read back through highdicom gives every finding's box, label, text and source reference exactly."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes

from sr_writer import BoundingBox, ResultUIDs, build_result_objects, render_sr
from sr_writer.context import ResultOptions
from sr_writer.findings import Language
from sr_writer.render import read_findings, read_sr
from sr_writer.sr import NO_FINDINGS_SERIES, NO_FINDINGS_TEXT
from tests.sr_writer.conftest import BuiltStudy
from tests.sr_writer.helpers import STUDIES, read, synthetic_result


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_srread_recovers_every_finding(name: str, built_studies: dict[str, BuiltStudy]):
    study = built_studies[name]
    (_, path), = study.of_modality("SR")
    sr = hd.sr.srread(path)
    report = sr.content
    planar = report.get_planar_roi_measurement_groups()
    findings = study.result.findings
    # Only findings with a box are measurement groups; those without are qualitative evaluations (issue 17).
    assert len(planar) == sum(f.box is not None for f in findings)
    assert report.get_image_measurement_groups() == []
    by_uid = {str(g.tracking_uid): g for g in planar}
    frames = int(study.source.get("NumberOfFrames") or 1)
    back = read_findings(path)
    assert len(back) == len(findings)
    for f in back:
        original = findings[int(f.tracking_id.split(":")[0][1:]) - 1]
        assert f.label == original.label
        assert f.comment == original.text
        if original.box is None:
            assert f.box is None
            assert f.tracking_uid not in by_uid
            continue
        group = by_uid[f.tracking_uid]
        written = BoundingBox(*(float(np.float32(v)) for v in original.box.as_list()))  # Graphic Data is FL
        assert f.box == written
        assert f.polyline == tuple(written.polyline())
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert f.source_sop_instance_uid == study.source.SOPInstanceUID
        assert f.frame == (original.source.frame_number if frames > 1 or "NumberOfFrames" in study.source else None)


def test_chinese_text_round_trips_exactly(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG1"]
    (_, path), = study.of_modality("SR")
    ds = dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    contents = read_sr(path)
    assert contents.language == "zh"
    assert [f.label for f in contents.findings] == [f.label for f in study.result.findings]
    assert [f.comment for f in contents.findings] == [f.text for f in study.result.findings]
    narrative = dict(contents.narrative)
    assert narrative["Findings"] == study.result.report.findings.replace("\n", "\r\n")
    assert narrative["Impression"] == study.result.report.impression
    assert "?" not in narrative["Impression"]


def test_ascii_report_keeps_the_source_character_set(built_studies: dict[str, BuiltStudy]):
    study = built_studies["MR2"]
    (sr, _), = study.of_modality("SR")
    assert sr.get("SpecificCharacterSet") == study.source.get("SpecificCharacterSet")


def test_report_structure_follows_tid_1500(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG3"]
    (sr, path), = study.of_modality("SR")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "PARTIAL"
    report = hd.sr.srread(path).content
    observer = report.get_observer_contexts()
    assert any(o.observer_type == codes.DCM.Device for o in observer)
    nodule = report.get_planar_roi_measurement_groups(finding_type=codes.SCT.Nodule)
    assert len(nodule) == 1
    root = sr.ContentSequence
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in root]
    assert "Image Library" in names
    assert "Qualitative Evaluations" in names
    assert "Procedure reported" in names
    (procedure,) = [item for item in root if item.ConceptNameCodeSequence[0].CodeMeaning == "Procedure reported"]
    cid100 = {getattr(codes.cid100, name).value for name in codes.cid100.dir()}
    assert procedure.ConceptCodeSequence[0].CodeValue in cid100  # TID 1500 row 4
    groups = report.get_planar_roi_measurement_groups()
    # Only what TID 1410 has rows for: no Geometric Purpose, no Algorithm Manufacturer, no free-text Comment.
    names_in_groups = {item.ConceptNameCodeSequence[0].CodeMeaning for g in groups for item in g[0].ContentSequence}
    assert not names_in_groups & {"Geometric purpose of region", "Algorithm Manufacturer", "Comment"}
    assert all(len(g.finding_sites) == 1 for g in groups)
    equipment = sr.ContributingEquipmentSequence
    algorithm = [e for e in equipment if e.get("ManufacturerModelName") == "TestVLM"]
    assert algorithm and algorithm[0].DeviceUID == study.result.algorithm.device_uid
    purpose = algorithm[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("Newcode1", "99IHE")


def test_uncoded_label_has_no_finding_type_but_keeps_its_text(built_studies: dict[str, BuiltStudy]):
    (_, path), = built_studies["RG3"].of_modality("SR")
    findings = {f.label: f for f in read_findings(path)}
    assert findings["odd shadow"].finding_type is None
    assert findings["nodule"].finding_type is not None
    assert findings["nodule"].finding_type.value == codes.SCT.Nodule.value
    assert findings["cardiomegaly"].box is None  # text-only finding


def test_study_without_findings_gets_a_valid_report_that_says_so():
    source = read("RG3_UNCI.dcm")
    result = synthetic_result(source, STUDIES["RG3"][1], findings=[]).with_findings([])
    result = type(result)(result.study_instance_uid, result.profile, result.algorithm)
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    objects = build_result_objects(result, [source], uids, ResultOptions.all())
    assert [ds.Modality for ds in objects] == ["SR"]
    contents = read_sr(objects[0])
    assert contents.findings == ()
    assert "No findings" in dict(contents.narrative)["Findings"]
    text = render_sr(objects[0])
    assert "(none)" in text and "No findings" in text
    assert "no findings" in objects[0].SeriesDescription


def test_chinese_study_without_findings_or_report_says_so_in_chinese(tmp_path: Path):
    """Nothing in the result is Chinese but its language: the report's own words are, and must survive encoding."""
    source = read("RG3_UNCI.dcm")
    base = synthetic_result(source, Language.CHINESE, findings=[])
    result = type(base)(base.study_instance_uid, base.profile, base.algorithm, language=Language.CHINESE)
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    (sr,) = build_result_objects(result, [source], uids, ResultOptions(sr=True))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert NO_FINDINGS_SERIES[Language.CHINESE] in back.SeriesDescription
    assert dict(read_sr(back).narrative)["Findings"] == NO_FINDINGS_TEXT[Language.CHINESE]


def test_render_shows_findings_boxes_and_narrative(built_studies: dict[str, BuiltStudy]):
    study = built_studies["RG3"]
    (_, path), = study.of_modality("SR")
    text = render_sr(path)
    box = study.result.findings[0].box
    assert box is not None
    assert "F1: nodule" in text
    assert f"{box.x0:g}, {box.y0:g}, {box.x1:g}, {box.y1:g}" in text
    assert study.result.findings[0].text in text
    assert "Impression:" in text and "Follow-up CT advised." in text
    assert "text only" in text
