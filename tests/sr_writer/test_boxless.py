"""Findings without a box (issue 17, item 1): no Measurement Group without an image region, text kept, round trip.

OHIF v3 draws every Measurement Group (125007) from its SCOORD; one without it makes the loader throw and the SR
viewport stays blank. A box-less finding is therefore written as a Finding in the report's Qualitative Evaluations.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from sr_writer import ResultUIDs, build_result_objects, render_sr
from sr_writer.context import ResultOptions
from sr_writer.findings import BoundingBox, Finding, ImageRef, Language
from sr_writer.render import read_findings, read_sr
from tests.sr_writer.helpers import dciodvfy, have_tool, read, synthetic_result

MEASUREMENT_GROUP = codes.DCM.MeasurementGroup.value
QUALITATIVE_EVALUATIONS = "C0034375"


def _boxed(ds: Dataset, n: int) -> Finding:
    cols, rows = int(ds.Columns), int(ds.Rows)
    box = BoundingBox(cols * 0.1 * n, rows * 0.1, cols * 0.1 * n + 20, rows * 0.1 + 20)
    return Finding(label="nodule", text=f"Nodule {n}.", box=box, source=ImageRef(str(ds.SOPInstanceUID)))


def _boxless(zh: bool = False) -> list[Finding]:
    return [
        Finding(label="心脏增大" if zh else "cardiomegaly", text="心影增大。" if zh else "The heart is enlarged."),
        Finding(label="odd shadow", text="Something odd, not located."),
    ]


def _cases(ds: Dataset) -> dict[str, list[Finding]]:
    boxless = _boxless()
    return {
        "first": [boxless[0], _boxed(ds, 1), _boxed(ds, 2)],
        "last": [_boxed(ds, 1), _boxed(ds, 2), boxless[1]],
        "middle": [_boxed(ds, 1), boxless[0], _boxed(ds, 2)],
        "alone": [boxless[0]],
        "only_boxless": boxless,
        "chinese": [_boxed(ds, 1), *_boxless(zh=True)],
        "none": [],
    }


def _walk(items: Any) -> list[Dataset]:
    found = []
    for item in items:
        found.append(item)
        found.extend(_walk(item.get("ContentSequence", [])))
    return found


def _concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Finding], Path]]:
    source = read("RG3_UNCI.dcm")
    out = tmp_path_factory.mktemp("boxless")
    built = {}
    for name, findings in _cases(source).items():
        language = Language.CHINESE if name == "chinese" else Language.ENGLISH
        result = synthetic_result(source, language, findings=findings)
        if not findings:  # a study the model found nothing in: no narrative either
            result = type(result)(result.study_instance_uid, result.profile, result.algorithm)
        uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile, run=1)
        (sr,) = [ds for ds in build_result_objects(result, [source], uids, ResultOptions.all()) if ds.Modality == "SR"]
        path = out / f"{name}.dcm"
        sr.save_as(path, enforce_file_format=True)
        built[name] = (findings, path)
    return built


CASES = ["first", "last", "middle", "alone", "only_boxless", "chinese", "none"]


@pytest.mark.parametrize("name", CASES)
def test_every_measurement_group_has_an_image_region(name: str, reports):
    findings, path = reports[name]
    items = _walk(dcmread(path).ContentSequence)
    groups = [i for i in items if i.ValueType == "CONTAINER" and _concept(i) == MEASUREMENT_GROUP]
    assert len(groups) == sum(f.box is not None for f in findings)
    for group in groups:
        assert any(child.ValueType == "SCOORD" for child in group.ContentSequence)


@pytest.mark.parametrize("name", CASES)
def test_boxless_findings_are_qualitative_evaluations_with_their_text(name: str, reports):
    findings, path = reports[name]
    root = dcmread(path).ContentSequence
    (evaluations,) = [i for i in root if _concept(i) == QUALITATIVE_EVALUATIONS]
    under = _walk(evaluations.ContentSequence)
    texts = [str(i.TextValue) for i in under if i.ValueType == "TEXT"]
    for f in findings:
        if f.box is None:
            assert f.text in texts
            assert any(t.endswith(f": {f.label}") for t in texts)


@pytest.mark.parametrize("name", CASES)
def test_round_trip_returns_every_finding_in_order(name: str, reports):
    findings, path = reports[name]
    back = read_findings(path)
    assert [f.label for f in back] == [f.label for f in findings]
    assert [f.comment for f in back] == [f.text for f in findings]
    assert [f.box is None for f in back] == [f.box is None for f in findings]
    assert len({f.tracking_uid for f in back}) == len(findings)
    assert all(f.tracking_id.startswith(f"F{i}: ") for i, f in enumerate(back, 1))
    narrative = dict(read_sr(path).narrative)
    assert set(narrative) <= {"Findings", "Impression"}
    text = render_sr(path)
    assert text.count("text only (no region)") == sum(f.box is None for f in findings)


def test_coded_boxless_finding_keeps_its_type(reports):
    _, path = reports["alone"]
    (back,) = read_findings(path)
    assert back.finding_type is not None  # "cardiomegaly" is in the lexicon
    assert back.box is None


def test_report_without_findings_still_says_so(reports):
    _, path = reports["none"]
    contents = read_sr(path)
    assert contents.findings == ()
    assert "No findings" in dict(contents.narrative)["Findings"]


@pytest.mark.skipif(not have_tool("dciodvfy"), reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("name", CASES)
def test_dciodvfy_reports_no_errors(name: str, reports):
    _, path = reports[name]
    verdict = dciodvfy(path)
    assert verdict.errors == []


@pytest.mark.skipif(not have_tool("dsrdump"), reason="dsrdump (Debian package dcmtk) is not installed")
@pytest.mark.parametrize("name", CASES)
def test_dsrdump_reads_it(name: str, reports):
    findings, path = reports[name]
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert proc.stdout.count('"Measurement Group"') == sum(f.box is not None for f in findings)
    for f in findings:
        if f.box is None:
            assert f.text in proc.stdout
