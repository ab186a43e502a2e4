"""OHIF 3.13 draws every box of the node's SRs, on the right image and frame, with words next to it (issue 17).

The SRs are loaded by OHIF's own code, headless: ``tests/sr_writer/ohif/load_sr.js`` runs the published
``@ohif/extension-cornerstone-dicom-sr`` 3.13 bundle with the real ``@ohif/core``, ``@cornerstonejs/core``,
``@cornerstonejs/tools``, ``@cornerstonejs/adapters`` and ``dcmjs`` (versions pinned in ``package.json`` and
``package-lock.json``; see the script's header for exactly what runs and what is stood in for). The packages are
installed with ``npm ci`` on first use; without Node.js and npm the tests are skipped.

Known in dcmjs 0.52 (OHIF's reader of DICOM files): text inside the sequences of a UTF-8 (ISO_IR 192) file is
decoded as windows-1252, so Chinese labels come out garbled from this reader; the comparison undoes that and checks
the Chinese words (OHIF reading over DICOMweb gets UTF-8 JSON from the archive and is not affected).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from sr_writer import ResultUIDs, build_result_objects
from sr_writer.context import ResultOptions
from sr_writer.findings import BoundingBox, Finding, ImageRef, InferenceResult, Language
from sr_writer.lexicon import finding_site_for, localized
from tests.corpus import corpus_file
from tests.sr_writer.helpers import STUDIES, read, synthetic_result

pytestmark = pytest.mark.integration

OHIF_DIR = Path(__file__).parent / "ohif"
FINDING_SITE = "363698007"  # OHIF writes the Finding Site's concept code before its meaning


@dataclass
class Case:
    """One SR to load: where it is, the source files OHIF shows beside it, and the findings it was made from."""

    name: str
    sr: Path
    images: list[Path]
    result: InferenceResult
    sources: list[Dataset]


@pytest.fixture(scope="module")
def ohif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding OHIF's packages, installed from the lock file when missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm (Debian packages nodejs, npm) are needed to run OHIF's SR code")
    if not (OHIF_DIR / "node_modules" / "@ohif" / "extension-cornerstone-dicom-sr").is_dir():
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=OHIF_DIR, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"npm ci failed in {OHIF_DIR}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return OHIF_DIR


def run_ohif(ohif: Path, cases: Sequence[Case], workdir: Path) -> dict[str, dict[str, Any]]:
    """Each case's SR as OHIF loads it (see load_sr.js), by case name."""
    request = workdir / "request.json"
    request.write_text(json.dumps([{"sr": str(c.sr), "images": [str(p) for p in c.images]} for c in cases]))
    proc = subprocess.run(
        ["node", str(ohif / "load_sr.js"), str(request)], cwd=ohif, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["versions"]["@ohif/extension-cornerstone-dicom-sr"].startswith("3.13."), out["versions"]
    return {case.name: result for case, result in zip(cases, out["results"], strict=True)}


def undo_dcmjs(text: str) -> str:
    """``text`` as written, from what dcmjs 0.52 made of it in a UTF-8 file: UTF-8 bytes decoded as WHATWG
    windows-1252 (Latin-1 with some runtimes); see the module docstring. Text without such bytes is unchanged."""
    try:
        raw = bytes(ord(ch) if ord(ch) < 256 else ch.encode("cp1252")[0] for ch in text)
        return raw.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def write_sr(name: str, result: InferenceResult, sources: list[Dataset], folder: Path) -> Path:
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile, run=1)
    (sr,) = build_result_objects(result, sources, uids, ResultOptions(sr=True, gsps=False, seg=False, sc=False))
    path = folder / f"{name}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def boxed(ds: Dataset, n: int, label: str = "nodule", frame: int = 1) -> Finding:
    cols, rows = int(ds.Columns), int(ds.Rows)
    box = BoundingBox(cols * 0.1 * n, rows * 0.1, cols * 0.1 * n + cols * 0.08, rows * 0.1 + rows * 0.1)
    return Finding(label=label, text=f"{label} {n}.", box=box, source=ImageRef(str(ds.SOPInstanceUID), frame))


BOXLESS = Finding(label="cardiomegaly", text="The heart is enlarged.")


def expected_text(finding: Finding, language: Language) -> str:
    """The words OHIF should draw for a boxed finding: its anatomic site, or else its label."""
    site = finding.site or finding_site_for(finding.label) or finding_site_for(finding.text)
    meaning = localized(site, language).meaning if site is not None else finding.label
    return f"{FINDING_SITE}: {meaning}"


def check_drawn(case: Case, loaded: dict[str, Any]) -> None:
    """Every boxed finding of ``case`` is one OHIF measurement, drawn on its image and frame, with its words."""
    assert "error" not in loaded, loaded.get("error")
    assert loaded["isImagingMeasurementReport"] is True
    expected = [(i, f) for i, f in enumerate(case.result.findings, start=1) if f.box is not None]
    by_id = {m["trackingIdentifier"]: m for m in loaded["measurements"]}
    assert len(by_id) == len(loaded["measurements"]) == len(expected), sorted(by_id)
    multiframe = {str(ds.SOPInstanceUID) for ds in case.sources if "NumberOfFrames" in ds}
    for index, finding in expected:
        assert finding.box is not None and finding.source is not None
        (measurement,) = [m for tid, m in by_id.items() if tid.startswith(f"F{index}:")]
        assert measurement["loaded"], measurement  # OHIF matched it to an image and added its annotation
        assert measurement["sopInstanceUID"] == finding.source.sop_instance_uid
        frame = finding.source.frame_number if finding.source.sop_instance_uid in multiframe else 1
        assert measurement["frame"] == frame
        corners = np.array(measurement["points"])[:, :2]
        box = finding.box
        want = np.array([(box.x0, box.y0), (box.x1, box.y0), (box.x1, box.y1), (box.x0, box.y1), (box.x0, box.y0)])
        np.testing.assert_allclose(corners, want, atol=1e-3)
        lines = measurement["textLines"]
        assert lines and all(line.split(": ", 1)[-1].strip() for line in lines), lines
        assert undo_dcmjs(lines[0]) == expected_text(finding, case.result.language)


def _corpus_cases(folder: Path) -> list[Case]:
    """Box-less findings first, last, alone and no finding at all, on CR, CT, MR and US, single and multi-frame;
    the synthetic mixed findings of every corpus image, Chinese included."""
    cases = []
    for name, (filename, language) in STUDIES.items():
        source = read(filename)
        frames = int(source.get("NumberOfFrames") or 1)
        variants: dict[str, list[Finding]] = {"mixed": []}  # synthetic_result's own findings
        if name in ("RG3", "CT693", "MR2", "US1", "USMF", "EMRI"):
            variants |= {
                "boxless_first": [BOXLESS, boxed(source, 1), boxed(source, 2, "left lung mass", frame=frames)],
                "boxless_last": [boxed(source, 1, frame=frames), boxed(source, 2), BOXLESS],
                "boxless_alone": [BOXLESS],
                "none": [],
            }
        for variant, findings in variants.items():
            result = synthetic_result(source, language, None if variant == "mixed" else findings)
            case_name = f"{name}-{variant}"
            cases.append(Case(case_name, write_sr(case_name, result, [source], folder), [corpus_file(filename)],
                              result, [source]))
    return cases


def _pipeline_case(folder: Path) -> Case:
    """An SR as the node's workers make one: the packaged demonstration model's findings on a phantom radiograph
    (Engine.run_study), turned into result objects by build_result_objects, as dicom_node.work.steps does."""
    from inference.config import ModelSettings
    from inference.demo.phantoms import generate_phantom
    from inference.engine import Engine

    phantom = generate_phantom(np.random.default_rng(5), kind="radiograph", n_lesions=2)
    path = phantom.save(folder / "phantom.dcm")
    result = Engine.load(ModelSettings(family="demo"), "cpu").run_study([path], "grounded_report", "en")
    assert any(f.box is not None for f in result.findings), result.findings
    source = read_source(path)
    return Case("pipeline", write_sr("pipeline", result, [source], folder), [path], result, [source])


def read_source(path: Path) -> Dataset:
    from pydicom import dcmread

    return dcmread(path)


@pytest.fixture(scope="module")
def loaded(ohif: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Case], dict[str, dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("ohif_srs")
    cases = [*_corpus_cases(folder), _pipeline_case(folder)]
    return cases, run_ohif(ohif, cases, folder)


def test_every_box_is_drawn_on_its_image_and_frame_with_words(
    loaded: tuple[list[Case], dict[str, dict[str, Any]]],
) -> None:
    cases, results = loaded
    failures = {}
    for case in cases:
        try:
            check_drawn(case, results[case.name])
        except AssertionError as exc:
            failures[case.name] = str(exc)[:600]
    assert failures == {}


def test_box_less_findings_never_blank_the_report(loaded: tuple[list[Case], dict[str, dict[str, Any]]]) -> None:
    _, results = loaded
    first = results["USMF-boxless_first"]
    assert [m["trackingIdentifier"] for m in first["measurements"]] == ["F2: nodule", "F3: left lung mass"]
    for name in ("RG3-boxless_alone", "RG3-none", "USMF-none"):
        assert "error" not in results[name] and results[name]["measurements"] == []


def test_a_report_without_findings_says_so_where_ohif_lists_it(
    loaded: tuple[list[Case], dict[str, dict[str, Any]]],
) -> None:
    _, results = loaded
    assert "no findings" in results["RG3-none"]["label"]
    assert "no findings" not in results["RG3-boxless_alone"]["label"]


def test_site_named_by_the_model_is_drawn_with_its_laterality_recorded(
    loaded: tuple[list[Case], dict[str, dict[str, Any]]],
) -> None:
    cases, results = loaded
    (mass,) = [m for m in results["CT693-boxless_first"]["measurements"] if m["trackingIdentifier"].endswith("mass")]
    assert mass["textLines"] == [f"{FINDING_SITE}: Lung"]
    case = next(c for c in cases if c.name == "CT693-boxless_first")
    from pydicom import dcmread

    sites = [
        item for item in _walk(dcmread(case.sr).ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeValue == FINDING_SITE
    ]
    lungs = [s for s in sites if s.ConceptCodeSequence[0].CodeMeaning == "Lung"]
    (lung,) = lungs
    (laterality,) = lung.ContentSequence
    assert laterality.ConceptCodeSequence[0].CodeMeaning == "Left"


def _walk(items: Any) -> list[Dataset]:
    found = []
    for item in items:
        found.append(item)
        found.extend(_walk(item.get("ContentSequence", [])))
    return found
