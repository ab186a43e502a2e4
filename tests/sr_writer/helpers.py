"""Synthetic findings and studies over the real corpus images, shared by the tests and bench/bench_sr_writer.py."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from sr_writer.findings import (
    AlgorithmIdentity,
    BoundingBox,
    Finding,
    ImageRef,
    InferenceResult,
    Language,
    Report,
    result_uid,
)
from tests.corpus import corpus_file

ALGORITHM = AlgorithmIdentity(
    name="TestVLM",
    version="ckpt-3f2a9c",
    family="test-family",
    manufacturer="DICOM AI node",
    parameters={"profile": "chest", "max_new_tokens": "256"},
)

# name -> (file, language); the multi-frame US of the corpus is color3d_jpeg_baseline.dcm (120 frames, JPEG).
# emri_small.dcm is an enhanced MR stripped of its functional groups (no per-frame geometry).
STUDIES = {
    "RG1": ("RG1_UNCI.dcm", Language.CHINESE),
    "RG3": ("RG3_UNCI.dcm", Language.ENGLISH),
    "CT693": ("693_UNCI.dcm", Language.ENGLISH),
    "MR2": ("MR2_UNCI.dcm", Language.ENGLISH),
    "US1": ("US1_UNCR.dcm", Language.ENGLISH),
    "USMF": ("color3d_jpeg_baseline.dcm", Language.CHINESE),
    "EMRI": ("emri_small.dcm", Language.ENGLISH),
    # An enhanced CT with functional groups (2 frames): the multi-frame SEG path with patient geometry.
    "ECT": ("eCT_Supplemental.dcm", Language.ENGLISH),
    # A PALETTE COLOR ultrasound: no presentation state (documented), the rest as usual.
    "USPAL": ("gdcm-US-ALOKA-16.dcm", Language.ENGLISH),
}


def read(name: str) -> Dataset:
    return pydicom.dcmread(corpus_file(name))


def ellipse_mask(rows: int, columns: int, box: BoundingBox) -> np.ndarray:
    """A filled ellipse inscribed in ``box`` (pixel centres inside)."""
    r = np.arange(rows)[:, None] + 0.5
    c = np.arange(columns)[None, :] + 0.5
    cy, cx = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
    ry, rx = box.height / 2, box.width / 2
    return ((r - cy) / ry) ** 2 + ((c - cx) / rx) ** 2 <= 1.0


def synthetic_findings(ds: Dataset, language: Language) -> list[Finding]:
    """Four findings on ``ds``: coded box, uncoded box with mask, second-frame box (multi-frame), text-only."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames") or 1)
    uid = str(ds.SOPInstanceUID)
    box1 = BoundingBox(cols * 0.20, rows * 0.25, cols * 0.45, rows * 0.50)
    box2 = BoundingBox(round(cols * 0.55), round(rows * 0.30), round(cols * 0.80), round(rows * 0.60))
    zh = language is Language.CHINESE
    findings = [
        Finding(
            label="左肺结节" if zh else "nodule",
            text="左肺上叶见一结节，边界清楚，约 12 mm。" if zh else "Well-defined nodule, left upper lobe, 12 mm.",
            box=box1,
            source=ImageRef(uid, 1),
            score=0.91,
            language=language,
        ),
        Finding(
            label="异常阴影" if zh else "odd shadow",
            text="性质待定的阴影。" if zh else "Shadow of uncertain nature.",
            box=box2,
            source=ImageRef(uid, min(2, frames)),
            mask=ellipse_mask(rows, cols, box2),
            language=language,
        ),
    ]
    if frames > 1:
        findings.append(
            Finding(
                label="cyst",
                text="Cyst on a later frame.",
                box=BoundingBox(cols * 0.1, rows * 0.1, cols * 0.3, rows * 0.3),
                source=ImageRef(uid, frames),
            )
        )
    findings.append(
        Finding(label="心脏增大" if zh else "cardiomegaly", text="心影增大。" if zh else "The heart is enlarged.")
    )
    return findings


def synthetic_result(ds: Dataset, language: Language, findings: Sequence[Finding] | None = None) -> InferenceResult:
    zh = language is Language.CHINESE
    return InferenceResult(
        study_instance_uid=str(ds.StudyInstanceUID),
        profile="test",
        algorithm=ALGORITHM,
        findings=tuple(synthetic_findings(ds, language) if findings is None else findings),
        report=Report(
            findings="双肺见结节影。\n心影增大。" if zh else "Nodule in the left lung.\nEnlarged heart.",
            impression="建议随访。" if zh else "Follow-up CT advised.",
            language=language,
        ),
        language=language,
    )


_PER_SLICE = {
    "SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "InstanceNumber", "ImagePositionPatient",
    "SliceThickness", "ImageOrientationPatient", "SliceLocation",
}


def synthetic_series(template: Dataset, count: int, seed: str = "series") -> list[Dataset]:
    """``count`` slices of a new CT series made from ``template``: new UIDs, positions 1 mm apart, same pixels."""
    series_uid = result_uid("synthetic", seed, "series")
    frame_of_reference = result_uid("synthetic", seed, "for")
    position = [float(v) for v in template.get("ImagePositionPatient", [0.0, 0.0, 0.0])]
    out = []
    for i in range(count):
        ds = pydicom.FileDataset("", Dataset(), preamble=b"\0" * 128)
        for elem in template:  # elements shared (pixel data too), except the ones set below
            if elem.keyword not in _PER_SLICE:
                ds.add(elem)
        ds.file_meta = copy.deepcopy(template.file_meta)
        ds.SOPInstanceUID = result_uid("synthetic", seed, "instance", i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [position[0], position[1], position[2] + i * 1.0]
        ds.SliceThickness = 1.0
        ds.ImageOrientationPatient = template.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
        out.append(ds)
    return out


@dataclass
class Verdict:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def dciodvfy(path: Path) -> Verdict:
    """dciodvfy's verdict on one file: its stderr lines starting with ``Error`` and ``Warning``."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    lines = (proc.stderr + proc.stdout).splitlines()
    return Verdict(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
    )


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


#: PixelMed's jar as Debian's libpixelmed-java installs it; DicomSRValidator needs nothing else on the class path.
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
#: Runs DicomSRValidator on many files in one Java process (Java's source-file mode: needs the JDK's compiler).
_VALIDATE_SRS = Path(__file__).parent / "pixelmed" / "ValidateSRs.java"
#: The validator's compiled templates exceed the XPath size limits of Java 17's secure processing; 0 lifts them.
_JAVA_XPATH_LIMITS = [f"-Djdk.xml.{name}=0" for name in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]


def have_pixelmed() -> bool:
    return have_tool("java") and PIXELMED_JAR.is_file()


def pixelmed_sr_validator(paths: Sequence[Path]) -> dict[Path, Verdict]:
    """PixelMed's DicomSRValidator on each SR of ``paths`` (IOD and root template, TID 1500 here): its ``Error``
    and ``Warning`` lines by file. A file whose template validation did not complete gets an error."""
    proc = subprocess.run(
        ["java", *_JAVA_XPATH_LIMITS, "-cp", str(PIXELMED_JAR), str(_VALIDATE_SRS), *map(str, paths)],
        capture_output=True, text=True, errors="replace", timeout=900,
    )
    chunks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("=== FILE "):
            current = chunks.setdefault(line.removeprefix("=== FILE "), [])
        else:
            current.append(line)
    out = {}
    for path in paths:
        lines = chunks.get(str(path))
        if lines is None:
            out[path] = Verdict(errors=[f"DicomSRValidator did not run (exit {proc.returncode}): {proc.stderr[-800:]}"])
            continue
        errors = [line for line in lines if line.startswith("Error")]
        if "Root Template Validation Complete" not in lines:
            errors.append("DicomSRValidator did not complete the template validation")
        out[path] = Verdict(errors=errors, warnings=[line for line in lines if line.startswith("Warning")])
    return out
