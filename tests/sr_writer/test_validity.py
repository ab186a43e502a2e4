"""Every result object of every corpus image is valid DICOM: dciodvfy reports no errors, dsrdump reads every SR, and
PixelMed's DicomSRValidator finds every SR template-clean (TID 1500), with findings, with box-less ones, without any."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sr_writer import ResultUIDs, build_result_objects
from sr_writer.context import ResultOptions
from sr_writer.findings import BoundingBox, Finding, ImageRef
from tests.corpus import corpus_file
from tests.sr_writer.conftest import BuiltStudy
from tests.sr_writer.helpers import (
    STUDIES,
    Verdict,
    dciodvfy,
    have_pixelmed,
    have_tool,
    pixelmed_sr_validator,
    read,
    synthetic_result,
)

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


def _variant_srs(folder: Path) -> dict[str, Path]:
    """SRs beside the corpus ones: no finding, a box-less finding alone, and a box whose anatomy and side the model
    names, on a CR, a CT and a multi-frame US."""
    out = {}
    for name in ("RG3", "CT693", "USMF"):
        filename, language = STUDIES[name]
        source = read(filename)
        cols, rows = int(source.Columns), int(source.Rows)
        located = Finding(
            label="left lung mass", text="Mass in the left lung.", box=BoundingBox(10, 10, cols / 2, rows / 2),
            source=ImageRef(str(source.SOPInstanceUID), int(source.get("NumberOfFrames") or 1)),
        )
        variants = {"none": [], "boxless_alone": [Finding(label="cardiomegaly")], "located": [located]}
        for variant, findings in variants.items():
            result = synthetic_result(source, language, findings)
            uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile, run=1)
            sr_only = ResultOptions(sr=True, gsps=False, seg=False, sc=False)
            (sr,) = build_result_objects(result, [source], uids, sr_only)
            path = folder / f"{name}-{variant}.dcm"
            sr.save_as(path, enforce_file_format=True)
            out[f"{name}-{variant}"] = path
    return out


@pytest.fixture(scope="module")
def every_sr(built_studies: dict[str, BuiltStudy], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    srs = {f"{name}-mixed": path for name, study in built_studies.items() for _, path in study.of_modality("SR")}
    return srs | _variant_srs(tmp_path_factory.mktemp("sr_variants"))


@pytest.fixture(scope="module")
def pixelmed_verdicts(every_sr: dict[str, Path]) -> Iterator[dict[str, Verdict]]:
    if not have_pixelmed():
        pytest.skip("PixelMed (Debian packages libpixelmed-java and default-jdk-headless) is not installed")
    by_path = pixelmed_sr_validator(list(every_sr.values()))
    yield {name: by_path[path] for name, path in every_sr.items()}


def test_pixelmed_sr_validator_reports_no_errors(pixelmed_verdicts: dict[str, Verdict]):
    errors = {name: verdict.errors for name, verdict in pixelmed_verdicts.items() if verdict.errors}
    assert errors == {}


def test_pixelmed_finds_nothing_out_of_place_in_measurement_groups(pixelmed_verdicts: dict[str, Verdict]):
    """The items PixelMed once flagged as outside TID 1410 are gone from the groups (dropped or moved; see
    sr_writer.sr). What it still warns about, and why that stays, is in sr_writer.sr's module docstring."""
    flagged = ("Algorithm Manufacturer", "Geometric purpose of region", '"Comment"): Content Item not in template')
    in_groups = {
        name: [w for w in verdict.warnings if "Measurement Group" in w and any(f in w for f in flagged)]
        for name, verdict in pixelmed_verdicts.items()
    }
    assert {name: w for name, w in in_groups.items() if w} == {}


@pytest.mark.skipif(not have_tool("dciodvfy"), reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors_on_the_variants(every_sr: dict[str, Path]):
    variants = {name: path for name, path in every_sr.items() if not name.endswith("-mixed")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        verdicts = dict(zip(variants, pool.map(dciodvfy, variants.values()), strict=True))
    assert {name: v.errors for name, v in verdicts.items() if v.errors} == {}
