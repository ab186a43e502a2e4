"""Each real-architecture family exported to ONNX and run by the onnxruntime backend, token for token against the
transformers backend: batch 1, a batch of 3 images of different sizes (for the Qwen families: different patch
grids), and a batch size and image sizes the export never saw. Families without an export are refused at load with
their reason.

The tiny random checkpoints' weights are scaled up (``sharpen``) before the export: with the 0.02 initialisation a
random model's greedy tokens hardly depend on positions, attention masks or image features, so a wrong M-RoPE
position, window mask or bidirectional image mask would go unseen; scaled, each of those changes the tokens.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.adapters.base import ModelAdapter
from inference.backends.hf import TransformersBackend
from inference.backends.onnxrt import OnnxRuntimeBackend
from inference.config import ModelSettings
from inference.engine import Engine
from inference.errors import ModelLoadError
from inference.export.exporter import export_checkpoint
from inference.export.manifest import ExportUnsupportedError
from inference.pixels import load_image
from inference.registry import adapter_class
from inference.types import ModelImage, PreparedInput, Profile, TaskRequest
from sr_writer.findings import Language
from tests.corpus import corpus_file

FAMILIES = ["qwen2_5_vl", "internvl", "medgemma", "qwen3_vl"]
#: Weight matrices are multiplied by this (see the module docstring).
SHARPEN = 12.0
MAX_NEW_TOKENS = 24


def sharpen(source: Path, target: Path, factor: float = SHARPEN) -> Path:
    """A copy of the checkpoint ``source`` with every weight matrix (not norms, not biases) times ``factor``.

    A matrix initialised to zeros (Gemma 3's image projector, InternViT's position embeddings) is drawn at random
    first: at zero, MedGemma's image features are all zero and no error in its image path could change a token.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, value in load_file(weights).items():
        if value.ndim >= 2:
            if not value.any():
                value = torch.randn(value.shape, generator=generator, dtype=value.dtype) * 0.02
            value = value * factor
        tensors[name] = value.contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


@dataclass
class Exported:
    family: str
    adapter: ModelAdapter
    reference: TransformersBackend
    graphs: OnnxRuntimeBackend
    folder: Path
    export_seconds: float
    settings: ModelSettings


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    family: str = request.param
    root = tmp_path_factory.mktemp(f"export-{family}")
    checkpoint = sharpen(tiny_checkpoint(family), root / "checkpoint")
    settings = ModelSettings(family=family, path=checkpoint, export_dir=root / "exports", backend="onnxruntime",
                             max_new_tokens=MAX_NEW_TOKENS, max_image_side=128)
    started = time.perf_counter()
    folder, written = export_checkpoint(settings)
    seconds = time.perf_counter() - started
    assert written and (folder / "manifest.json").is_file()
    adapter = adapter_class(family)(settings)
    reference = TransformersBackend(adapter, settings, "cpu")
    reference.load()
    graphs = OnnxRuntimeBackend(adapter, settings, "cpu")
    graphs.load()
    yield Exported(family, adapter, reference, graphs, folder, seconds, settings)


def _images() -> list[ModelImage]:
    """Real clinical images and crops of them: different sizes and aspect ratios."""
    chest = load_image(corpus_file("RG1_UNCI.dcm"))
    return [
        chest,
        replace(chest, pixels=np.ascontiguousarray(chest.pixels[:, : chest.columns // 2])),  # tall
        replace(chest, pixels=np.ascontiguousarray(chest.pixels[: chest.rows // 3])),  # wide
        load_image(corpus_file("US1_UNCR.dcm")),
        load_image(corpus_file("693_UNCI.dcm")),
        replace(chest, pixels=np.ascontiguousarray(chest.pixels[: chest.rows // 2, : chest.columns // 4])),
    ]


REQUESTS = [
    TaskRequest(Profile.TEXT_TO_REGION, targets=("right lung",)),
    TaskRequest(Profile.GROUNDED_REPORT, Language.CHINESE),
    TaskRequest(Profile.VQA, question="What does this image show?"),
]


def _items(adapter: ModelAdapter, indices: list[int]) -> list[PreparedInput]:
    images = _images()
    return [adapter.prepare(images[i], REQUESTS[n % len(REQUESTS)]) for n, i in enumerate(indices)]


def _same_tokens(exported: Exported, batch: list[PreparedInput]) -> tuple[np.ndarray, np.ndarray]:
    expected = exported.reference.generate_tokens(batch)
    got = exported.graphs.generate_tokens(batch)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert (got == expected).all(), f"{exported.family}: onnxruntime\n{got}\ntransformers\n{expected}"
    return expected, got


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_batch_of_one_gives_the_tokens_of_transformers(exported: Exported) -> None:
    expected, _ = _same_tokens(exported, _items(exported.adapter, [0]))
    assert expected.shape == (1, MAX_NEW_TOKENS)  # the random model never stops early here: every step is compared


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_batch_of_three_image_sizes_gives_the_tokens_of_transformers(exported: Exported) -> None:
    batch = _items(exported.adapter, [0, 1, 2])
    assert len({item.image.pixels.shape for item in batch}) == 3
    if exported.family.startswith("qwen"):  # different patch grids, so different image-token counts
        assert len({item.pixels.shape for item in batch}) == 3
    _same_tokens(exported, batch)


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_batch_size_and_image_sizes_not_used_at_export_run(exported: Exported) -> None:
    """The export used batches of 2 and 3; five images, two of them of sizes seen nowhere else."""
    batch = _items(exported.adapter, [3, 4, 5, 1, 0])
    expected, _ = _same_tokens(exported, batch)
    assert expected.shape[0] == 5


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_prefill_logits_equal_those_of_transformers(exported: Exported) -> None:
    """Tokens hide small errors (an image token attending to the wrong neighbours moves the logits but seldom the
    argmax): the last position's logits of the prefill must match too."""
    from inference.backends.graphs import prefill

    batch = _items(exported.adapter, [0, 1, 2])
    handle = exported.reference.handle
    assert handle is not None and exported.graphs.runner is not None
    with torch.inference_mode():
        expected = handle.model(**exported.adapter.hf_encode(handle, batch, "cpu")).logits[:, -1].numpy()
    outputs, _ = prefill(exported.graphs.runner, exported.graphs.encode(batch))
    got = exported.graphs.runner.to_host(outputs[0])
    assert float(np.abs(got - expected).max()) < 1e-3 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_model_check_loads_the_export_and_agrees_with_transformers(exported: Exported) -> None:
    """``dicom-node model check --compare``: Engine.load on onnxruntime, one generation, transformers agrees."""
    from inference.model_check import check_model

    lines, agreed = check_model(exported.settings, compare=True)
    assert agreed, lines
    assert f"loaded {exported.family} checkpoint" in lines[0] and "onnxruntime/cpu" in lines[0]


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_the_export_records_the_family_and_its_graphs(exported: Exported) -> None:
    from inference.export.manifest import ExportManifest

    manifest = ExportManifest.read(exported.folder)
    assert manifest.family == exported.family
    assert set(manifest.graphs) == {"vision", "embed", "decoder"}
    print(f"{exported.family}: exported and checked in {exported.export_seconds:.1f} s")


@pytest.mark.slow  # exports the family once per module (10-20 s each)
def test_tensorrt_parses_the_graphs_and_builds_engines(exported: Exported) -> None:
    """TensorRT for RTX builds engines on the CPU: the family's graphs hold no operator TensorRT refuses (Qwen3-VL's
    deepstack addition is a gather, not a NonZero) and the recorded ranges cover every dynamic axis."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (tensorrt-rtx-cu12) is not installed")
    from inference.export.manifest import ExportManifest
    from inference.export.tensorrt_build import DimRanges, build_engine

    manifest = ExportManifest.read(exported.folder)
    ranges = DimRanges.for_generation(8, 512, manifest.dim_ranges)
    for name, graph in manifest.graphs.items():
        assert len(build_engine(trt, exported.folder / graph.file, ranges)) > 100_000, name


# -- the Qwen families' host-side preparation against transformers' own torch code --
def test_mrope_positions_equal_get_rope_index(tiny_checkpoint: Callable[[str], Path]) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from inference.adapters.qwen import mrope_positions

    settings = ModelSettings(family="qwen2_5_vl", path=tiny_checkpoint("qwen2_5_vl"), max_image_side=128)
    adapter = adapter_class("qwen2_5_vl")(settings)
    handle = adapter.hf_load_preprocessing(tiny_checkpoint("qwen2_5_vl"))
    batch = _items(adapter, [0, 1, 2])
    image_inputs, ids, mask = adapter.export_tokens(handle, batch)
    grids = image_inputs["image_grid_thw"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    token_types = torch.from_numpy((ids == handle.config.image_token_id).astype(np.int64))
    expected, _ = model.model.get_rope_index(torch.from_numpy(ids), token_types, image_grid_thw=grids,
                                             attention_mask=torch.from_numpy(mask))
    got = mrope_positions(ids, mask, int(handle.config.image_token_id), grids.tolist(), 2)
    assert (mask == 0).any()  # left padding is part of the check
    np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("grid", [(8, 8), (6, 14), (12, 4), (2, 2)])
def test_vision_windows_and_positions_equal_transformers(grid: tuple[int, int]) -> None:
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from inference.adapters.qwen import vision_patch_positions, vision_windows

    h, w = grid
    thw = torch.tensor([[1, h, w]])
    order, window_of = vision_windows(h, w, merge=2, window=2)
    expected_order, cu_windows = get_vision_window_index(thw, spatial_merge_size=2, window_size=56, patch_size=14)
    np.testing.assert_array_equal(order, expected_order.numpy())
    sizes = np.bincount(window_of) * 4
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes[sizes > 0])]), cu_windows.numpy())
    np.testing.assert_array_equal(vision_patch_positions(h, w, 2), get_vision_position_ids(thw, 2).numpy())


# -- families without an export --
def _medrega_checkpoint(directory: Path) -> Path:
    from tests.inference.test_medrega_and_loading import medrega_checkpoint

    directory.mkdir()
    return medrega_checkpoint(directory)


def test_medrega_is_refused_by_the_onnxruntime_backend_with_the_reason(tmp_path: Path) -> None:
    settings = ModelSettings(family="medrega", path=_medrega_checkpoint(tmp_path / "medrega"), backend="onnxruntime",
                             export_dir=tmp_path / "exports", trust_remote_code=True)
    with pytest.raises(ModelLoadError, match="family 'medrega' cannot run on the onnxruntime") as raised:
        Engine.load(settings)
    assert "InternVLChatModel" in str(raised.value) and "model.backend: transformers" in str(raised.value)


def test_medrega_export_is_refused_before_any_file_is_read(tmp_path: Path) -> None:
    settings = ModelSettings(family="medrega", path=tmp_path / "absent", export_dir=tmp_path / "exports",
                             trust_remote_code=True)
    with pytest.raises(ExportUnsupportedError, match="remote code"):
        export_checkpoint(settings)
    assert not (tmp_path / "exports").exists()


@pytest.mark.slow  # one float16 export per family (10-20 s each)
def test_a_float16_export_runs_and_starts_as_float32_does(exported: Exported, tmp_path: Path) -> None:
    """Half precision: the family's float inputs built on the host (pixels, Qwen's vision masks and positions)
    reach the graphs as float16, and the answers start with float32's tokens (later ones may round apart)."""
    settings = exported.settings.model_copy(update={"export_dir": tmp_path / "half"})
    folder, written = export_checkpoint(settings, dtype="float16")
    assert written and '"dtype": "float16"' in (folder / "manifest.json").read_text()
    half = OnnxRuntimeBackend(exported.adapter, settings, "cpu")
    half.load()
    batch = _items(exported.adapter, [0, 3])
    tokens = half.generate_tokens(batch)
    expected = exported.reference.generate_tokens(batch)
    assert tokens.shape == expected.shape
    np.testing.assert_array_equal(tokens[:, :2], expected[:, :2])
