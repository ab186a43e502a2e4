"""Session fixtures: every result object built once per corpus image, written, and checked by dciodvfy once."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from sr_writer import ResultUIDs
from sr_writer.api import build_result_objects
from sr_writer.context import ResultOptions
from sr_writer.findings import InferenceResult
from tests.sr_writer.helpers import STUDIES, Verdict, dciodvfy, have_tool, read, synthetic_result


@dataclass
class BuiltStudy:
    name: str
    source: Dataset
    result: InferenceResult
    objects: list[Dataset]
    paths: list[Path]

    def of_modality(self, modality: str) -> list[tuple[Dataset, Path]]:
        return [(ds, p) for ds, p in zip(self.objects, self.paths, strict=True) if ds.Modality == modality]


def _build(name: str, outdir: Path) -> BuiltStudy:
    filename, language = STUDIES[name]
    source = read(filename)
    result = synthetic_result(source, language)
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile, run=1)
    objects = build_result_objects(result, [source], uids, ResultOptions.all())
    folder = outdir / name
    folder.mkdir()
    paths = []
    for ds in objects:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return BuiltStudy(name, source, result, objects, paths)


@pytest.fixture(scope="session")
def built_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BuiltStudy]:
    outdir = tmp_path_factory.mktemp("sr_writer_objects")
    return {name: _build(name, outdir) for name in STUDIES}


@pytest.fixture(scope="session")
def verdicts(built_studies: dict[str, BuiltStudy]) -> Iterator[dict[Path, Verdict]]:
    if not have_tool("dciodvfy"):
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    paths = [p for study in built_studies.values() for p in study.paths]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield dict(zip(paths, pool.map(dciodvfy, paths), strict=True))
