"""The graph backends on the demo model: `dicom-node model export`, onnxruntime against transformers token for
token, missing and stale exports, a missing TensorRT, and TensorRT accepting the graphs (TensorRT for RTX builds
engines without a GPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from inference.adapters.demo import DemoAdapter
from inference.backends.hf import TransformersBackend
from inference.backends.onnxrt import BoundOnnxRuntimeRunner, OnnxRuntimeBackend
from inference.config import ModelSettings
from inference.demo.evaluate import model_image
from inference.demo.phantoms import generate_phantom
from inference.engine import Engine
from inference.errors import ModelLoadError
from inference.types import PreparedInput, Profile, TaskRequest
from sr_writer.findings import Language


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the configuration file, the export folder) after `dicom-node model export` of the demo checkpoint."""
    root = tmp_path_factory.mktemp("graph-backends")
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(root / "var")}, "model": {"backend": "onnxruntime"}}))
    run = _cli("model", "export", "--config", str(config), cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    folders = list((root / "var" / "model-exports").glob("demo-*"))
    assert len(folders) == 1 and (folders[0] / "manifest.json").is_file(), folders
    assert "exported to" in run.stdout
    return config, folders[0]


@pytest.fixture(scope="module")
def backends(exported: tuple[Path, Path]) -> tuple[TransformersBackend, OnnxRuntimeBackend, DemoAdapter]:
    settings = ModelSettings(export_dir=exported[1].parent)
    adapter = DemoAdapter(settings)
    reference = TransformersBackend(adapter, settings, "cpu")
    reference.load()
    graphs = OnnxRuntimeBackend(adapter, settings, "cpu")
    graphs.load()
    return reference, graphs, adapter


def _items(adapter: DemoAdapter, count: int, seed: int) -> list[PreparedInput]:
    """Phantoms of different sizes and kinds, with English, Chinese and text-to-region requests."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        phantom = generate_phantom(rng, kind="radiograph" if i % 2 == 0 else "ct")
        request = (
            TaskRequest(Profile.TEXT_TO_REGION, targets=("nodule", "heart")) if i % 3 == 1
            else TaskRequest(Profile.GROUNDED_REPORT, Language.CHINESE if i % 3 == 2 else Language.ENGLISH)
        )
        items.append(adapter.prepare(model_image(phantom), request))
    return items


@pytest.mark.parametrize(("count", "seed"), [(1, 11), (3, 12), (5, 13)])
def test_onnxruntime_gives_the_same_greedy_tokens_as_transformers(
    backends: tuple[TransformersBackend, OnnxRuntimeBackend, DemoAdapter], count: int, seed: int
) -> None:
    reference, graphs, adapter = backends
    items = _items(adapter, count, seed)
    assert len({item.image.pixels.shape for item in items}) == count or count == 1  # images of different sizes
    expected = reference.generate_tokens(items)
    got = graphs.generate_tokens(items)
    assert expected.shape[1] > 10, "long enough answers to compare"
    np.testing.assert_array_equal(got, expected)
    assert graphs.generate(items) == reference.generate(items)


def test_io_bindings_on_torch_tensors_give_the_same_tokens(
    backends: tuple[TransformersBackend, OnnxRuntimeBackend, DemoAdapter], exported: tuple[Path, Path]
) -> None:
    """The CUDA code path of the onnxruntime backend (values and KV buffers as torch tensors bound by address, new
    keys and values written into the buffers on the device), run here on the CPU."""
    reference, graphs, adapter = backends
    assert graphs.manifest is not None
    bound = OnnxRuntimeBackend(adapter, ModelSettings(export_dir=exported[1].parent), "cpu")
    bound.handle, bound.manifest = graphs.handle, graphs.manifest
    bound.runner = BoundOnnxRuntimeRunner(exported[1], graphs.manifest, "cpu")
    items = _items(adapter, 3, 14)
    np.testing.assert_array_equal(bound.generate_tokens(items), reference.generate_tokens(items))


def test_engine_runs_a_study_on_onnxruntime_with_the_same_findings(exported: tuple[Path, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(31)
    paths = [generate_phantom(rng, kind="radiograph", n_lesions=2).save(tmp_path / f"{i}.dcm") for i in range(2)]
    results = {}
    for backend in ("transformers", "onnxruntime"):
        settings = ModelSettings(backend=backend, export_dir=exported[1].parent, batch_size=2)
        engine = Engine.load(settings)
        assert engine.identity.parameters["backend"] == backend
        results[backend] = engine.run_study(paths, "grounded_report", "en")
    boxed = [f for f in results["transformers"].findings if f.box is not None]
    assert boxed, "the demo model finds the phantoms' lesions"
    assert results["onnxruntime"].findings == results["transformers"].findings
    assert results["onnxruntime"].report == results["transformers"].report


def test_model_check_loads_the_export_generates_and_agrees_with_transformers(exported: tuple[Path, Path]) -> None:
    config, folder = exported
    run = _cli("model", "check", "--config", str(config), "--compare", cwd=folder.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "on onnxruntime/cpu" in run.stdout and "transformers gives the same" in run.stdout, run.stdout


def test_a_missing_export_stops_the_load_saying_how_to_make_it(tmp_path: Path) -> None:
    settings = ModelSettings(backend="onnxruntime", export_dir=tmp_path / "exports")
    with pytest.raises(ModelLoadError, match=r"no ONNX export of the 'demo' checkpoint .* `dicom-node model export`"):
        Engine.load(settings)


def test_an_export_of_another_checkpoint_version_is_reported_stale(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    _, folder = exported
    exports = tmp_path / "exports"
    old = exports / "demo-0123456789abcdef"
    shutil.copytree(folder, old)
    settings = ModelSettings(backend="onnxruntime", export_dir=exports)
    with pytest.raises(ModelLoadError, match=r"demo-0123456789abcdef\) were made from another version .*\(stale\)"):
        Engine.load(settings)
    # A folder under the right name whose manifest names another version (copied by hand) is stale too.
    current = exports / folder.name
    shutil.copytree(folder, current)
    manifest = json.loads((current / "manifest.json").read_text())
    manifest["fingerprint"] = "0123456789abcdef"
    (current / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"was made from demo version 0123456789abcdef.*\(stale\).*--force"):
        Engine.load(settings)


def test_a_missing_graph_file_is_reported_not_a_traceback(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, folder = exported
    copy = tmp_path / "exports" / folder.name
    shutil.copytree(folder, copy)
    (copy / "decoder.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"graph 'decoder' \(decoder.onnx\) is missing"):
        Engine.load(ModelSettings(backend="onnxruntime", export_dir=copy.parent))


def test_export_again_only_when_forced(exported: tuple[Path, Path]) -> None:
    config, folder = exported
    before = (folder / "manifest.json").stat().st_mtime_ns
    run = _cli("model", "export", "--config", str(config), cwd=folder.parent)
    assert run.returncode == 0 and "a valid export already exists" in run.stdout, run.stdout + run.stderr
    assert (folder / "manifest.json").stat().st_mtime_ns == before


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@pytest.mark.skipif(_tensorrt_installed(), reason="NVIDIA TensorRT is installed here: the missing-runtime path")
def test_a_worker_asked_for_tensorrt_without_it_stops_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(tmp_path / "var")},
                                      "model": {"backend": "tensorrt", "device": "cuda"}}))
    run = _cli("worker", "--config", str(config), "--queues", "inference", cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "needs the NVIDIA TensorRT Python module `tensorrt`" in lines[0]
    assert "pip install tensorrt-cu12" in lines[0] and "model.backend: onnxruntime" in lines[0]
    assert "Traceback" not in run.stdout + run.stderr


def test_tensorrt_on_a_cpu_device_is_refused_before_anything_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference.backends import tensorrt as backend

    monkeypatch.setattr(backend, "import_tensorrt", lambda: object())  # as if installed: the device is the problem
    with pytest.raises(ModelLoadError, match=r"runs on an NVIDIA GPU, but model.device is 'cpu'"):
        Engine.preflight(ModelSettings(backend="tensorrt", device="cpu"))


def test_tensorrt_parses_the_graphs_and_builds_engines(exported: tuple[Path, Path]) -> None:
    """TensorRT for RTX (installable without a GPU) parses every graph and builds an engine with the profiles the
    tensorrt backend uses; full TensorRT on an NVIDIA GPU uses the same builder code."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (tensorrt-rtx-cu12) is not installed")
    from inference.export.manifest import ExportManifest
    from inference.export.tensorrt_build import DimRanges, build_engine

    _, folder = exported
    manifest = ExportManifest.read(folder)
    ranges = DimRanges.for_generation(8, 512, manifest.dim_ranges)
    for name, graph in manifest.graphs.items():
        engine = build_engine(trt, folder / graph.file, ranges)
        assert len(engine) > 100_000, name
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        deserialized = runtime.deserialize_cuda_engine(engine)
        if deserialized is not None:  # deserialising needs a GPU on some builds; where it works, check the I/O
            names = {deserialized.get_tensor_name(i) for i in range(deserialized.num_io_tensors)}
            assert set(graph.inputs) | set(graph.outputs) <= names


def _cuda_tensorrt() -> str:
    if not _tensorrt_installed():
        return "NVIDIA TensorRT (module tensorrt) is not installed"
    import torch

    return "" if torch.cuda.is_available() else "no CUDA device"


@pytest.mark.skipif(bool(_cuda_tensorrt()), reason=f"tensorrt backend run: {_cuda_tensorrt() or 'available'}")
def test_tensorrt_engines_give_the_same_tokens_as_transformers(
    backends: tuple[TransformersBackend, OnnxRuntimeBackend, DemoAdapter], exported: tuple[Path, Path]
) -> None:
    from inference.backends.tensorrt import TensorRTBackend

    reference, _, adapter = backends
    settings = ModelSettings(backend="tensorrt", device="cuda", export_dir=exported[1].parent, batch_size=4)
    engines = TensorRTBackend(adapter, settings, "cuda")
    engines.load()
    for count, seed in ((1, 41), (3, 42)):
        items = _items(adapter, count, seed)
        np.testing.assert_array_equal(engines.generate_tokens(items), reference.generate_tokens(items))


@pytest.fixture(scope="module")
def exported_half(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the configuration file, the export folder) after `dicom-node model export --dtype float16`."""
    root = tmp_path_factory.mktemp("graph-backends-half")
    config = root / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(root / "var")}, "model": {"backend": "onnxruntime"}}))
    run = _cli("model", "export", "--config", str(config), "--dtype", "float16", cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    return config, next((root / "var" / "model-exports").glob("demo-*"))


def _boxes(text: str) -> list[tuple[str, list[int]]]:
    import re

    return [(label, [int(v) for v in box.split(",")])
            for label, box in re.findall(r"<ref>([^<]*)</ref><box>\[\[([^\]]*)\]\]</box>", text)]


def test_a_float16_export_runs_and_answers_as_float32_does_within_rounding(
    backends: tuple[TransformersBackend, OnnxRuntimeBackend, DemoAdapter], exported: tuple[Path, Path],
    exported_half: tuple[Path, Path],
) -> None:
    reference, _, adapter = backends
    manifest = json.loads((exported_half[1] / "manifest.json").read_text())
    assert manifest["dtype"] == "float16"
    weights = {folder: sum(p.stat().st_size for p in folder.glob("*.data"))
               for folder in (exported[1], exported_half[1])}
    assert weights[exported_half[1]] < 0.6 * weights[exported[1]], weights  # half the bytes per weight
    half = OnnxRuntimeBackend(adapter, ModelSettings(export_dir=exported_half[1].parent), "cpu")
    half.load()
    assert half.describe()["dtype"] == "float16"
    items = _items(adapter, 5, 21)
    tokens = half.generate_tokens(items)
    bound = OnnxRuntimeBackend(adapter, ModelSettings(export_dir=exported_half[1].parent), "cpu")
    bound.handle, bound.manifest = half.handle, half.manifest
    assert half.manifest is not None
    bound.runner = BoundOnnxRuntimeRunner(exported_half[1], half.manifest, "cpu")
    np.testing.assert_array_equal(bound.generate_tokens(items), tokens)
    # The same findings as float32, each box within rounding (2% of the 0..999 scale) of float32's.
    boxed = 0
    for mine, theirs in zip(half.generate(items), reference.generate(items), strict=True):
        got, want = _boxes(mine), _boxes(theirs)
        assert [label for label, _ in got] == [label for label, _ in want], (mine, theirs)
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 20, (mine, theirs)
            boxed += 1
    assert boxed >= 3, "the phantoms' lesions are found"


def test_model_check_compares_a_float16_export_with_float16_transformers(exported_half: tuple[Path, Path]) -> None:
    run = _cli("model", "check", "--config", str(exported_half[0]), "--compare", cwd=exported_half[1].parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "transformers gives the same" in run.stdout or "transformers agrees on the first" in run.stdout, run.stdout
    assert "(float16" in run.stdout, run.stdout


def test_an_export_of_the_other_precision_is_replaced_only_with_force(exported_half: tuple[Path, Path]) -> None:
    config, folder = exported_half
    run = _cli("model", "export", "--config", str(config), cwd=folder.parent)
    assert run.returncode == 1
    assert "is float16, not float32" in run.stderr and "--force" in run.stderr, run.stderr
    assert json.loads((folder / "manifest.json").read_text())["dtype"] == "float16"  # left as it was


def test_a_checkpoints_repetition_penalty_is_applied_as_transformers_applies_it(
    backends: tuple[TransformersBackend, OnnxRuntimeBackend, DemoAdapter], tmp_path: Path
) -> None:
    """The decode loop's own repetition penalty (on the host, from generation_config.json) against transformers'
    generate; and the penalty does change the answer here, so the comparison is not vacuous."""
    from inference.demo import CHECKPOINT_DIR
    from inference.export.exporter import export_checkpoint

    checkpoint = tmp_path / "penalised"
    shutil.copytree(CHECKPOINT_DIR, checkpoint)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (checkpoint / "generation_config.json").write_text(json.dumps({**generation, "repetition_penalty": 1.8}))
    settings = ModelSettings(path=checkpoint, export_dir=tmp_path / "exports")
    export_checkpoint(settings)
    adapter = DemoAdapter(settings)
    reference = TransformersBackend(adapter, settings, "cpu")
    reference.load()
    graphs = OnnxRuntimeBackend(adapter, settings, "cpu")
    graphs.load()
    assert graphs.repetition_penalty == 1.8
    items = _items(adapter, 3, 41)
    expected = reference.generate_tokens(items)
    np.testing.assert_array_equal(graphs.generate_tokens(items), expected)
    plain = backends[0].generate_tokens(items)
    assert plain.shape != expected.shape or (plain != expected).any(), "the penalty changed no token"
