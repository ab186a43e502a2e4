"""Every result object of every corpus image is valid DICOM: dciodvfy reports no errors, dsrdump reads every SR."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.corpus import corpus_file
from tests.sr_writer.conftest import BuiltStudy
from tests.sr_writer.helpers import STUDIES, Verdict, have_tool

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_dciodvfy_reports_no_errors(name: str, built_studies: dict[str, BuiltStudy], verdicts: dict[Path, Verdict]):
    study = built_studies[name]
    errors = {
        f"{ds.Modality} {path.name}": verdicts[path].errors
        for ds, path in zip(study.objects, study.paths, strict=True)
        if verdicts[path].errors
    }
    assert errors == {}


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_object_kind_is_built(name: str, built_studies: dict[str, BuiltStudy]):
    modalities = {ds.Modality for ds in built_studies[name].objects}
    expected = {"SR", "PR", "OT"}
    # highdicom 0.28 cannot build a SEG over several frames of a source without patient geometry: the cine US
    # (no frame of reference) and emri_small (an enhanced MR stripped of its functional groups).
    if name not in ("USMF", "EMRI"):
        expected.add("SEG")
    if name == "USPAL":  # no presentation state for PALETTE COLOR sources
        expected.discard("PR")
    assert modalities == expected


@pytest.mark.skipif(not have_tool("dsrdump"), reason="dsrdump (Debian package dcmtk) is not installed")
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_dsrdump_reads_the_report(name: str, built_studies: dict[str, BuiltStudy]):
    (_, path), = built_studies[name].of_modality("SR")
    proc = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert "Imaging Measurement Report" in proc.stdout
    findings = built_studies[name].result.findings
    assert proc.stdout.count('"Measurement Group"') == sum(f.box is not None for f in findings)  # boxes only


def test_all_objects_share_patient_and_study(built_studies: dict[str, BuiltStudy]):
    for study in built_studies.values():
        for ds in study.objects:
            assert ds.StudyInstanceUID == study.source.StudyInstanceUID
            assert ds.PatientID == study.source.PatientID
            assert ds.SeriesInstanceUID != study.source.SeriesInstanceUID
            assert "TestVLM" in ds.SeriesDescription
            assert ds.Manufacturer == "DICOM AI node"
            assert ds.ManufacturerModelName == "TestVLM"
            assert "ckpt-3f2a9c" in ds.SoftwareVersions


def test_series_are_one_per_object_kind(built_studies: dict[str, BuiltStudy]):
    study = built_studies["USMF"]
    series = {}
    for ds in study.objects:
        series.setdefault(ds.Modality, set()).add(ds.SeriesInstanceUID)
    assert all(len(uids) == 1 for uids in series.values())
    assert len({next(iter(u)) for u in series.values()}) == len(series)


@pytest.mark.skipif(not have_tool("dcentvfy"), reason="dcentvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("name", ["RG1", "CT693", "USMF"])
def test_dcentvfy_finds_the_study_consistent(name: str, built_studies: dict[str, BuiltStudy]):
    study = built_studies[name]
    source = corpus_file(STUDIES[name][0])
    proc = subprocess.run(
        ["dcentvfy", str(source), *map(str, study.paths)], capture_output=True, text=True, errors="replace",
        timeout=120,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    assert not [line for line in lines if "StudyDescription" in line or "PatientIdentityRemoved" in line]
