"""MedRegA's input building and answer path, checkpoint checks, offline loading, regions from GSPS/SR.

MedRegA ships its own modelling code (``InternVLChatModel``, trust_remote_code) which is not part of transformers
and cannot be built here, so its test replaces only the model object by a stand-in that checks the tensors it is
given and answers with fixed tokens; the tokenizer, prompt, image tensor, token expansion, backend, decoding and
parsing are the production code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from inference.adapters.base import HFHandle
from inference.adapters.medrega import MedRegAAdapter
from inference.backends.hf import TransformersBackend
from inference.config import ModelSettings
from inference.engine import Engine, compose_report
from inference.errors import ModelLoadError, PoisonInputError
from inference.pixels import load_image
from inference.regions import region_from_dataset
from inference.types import Profile, TaskRequest
from sr_writer.findings import BoundingBox, Language
from tests.corpus import corpus_file
from tests.inference.tiny_models import CHATML_TEMPLATE, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
ANSWER = "<ref> right lung </ref> <box> [[ 102 , 106 , 481 , 910 ]] </box> : No effusion."


def medrega_checkpoint(directory: Path) -> Path:
    (directory / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    (directory / "model.safetensors").write_bytes(b"")
    (directory / "modeling_internvl_chat.py").write_text("# shipped with the checkpoint\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    build_tokenizer(directory, specials, eos="<|im_end|>", pad="<|endoftext|>", template=CHATML_TEMPLATE)
    return directory


class StandInChatModel(torch.nn.Module):
    """Checks what InternVLChatModel.generate would get and answers with fixed tokens (new tokens only)."""

    num_image_token = 4

    def __init__(self, answer_ids: list[int]) -> None:
        super().__init__()
        self.answer_ids = answer_ids
        self.calls: list[dict[str, Any]] = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def generate(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        self.calls.append(
            {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        )
        return torch.tensor([[*self.answer_ids, kwargs["eos_token_id"]]] * input_ids.shape[0])


class StandInMedRegA(MedRegAAdapter):
    def hf_load(self, directory: Path, device: str, dtype: Any, attn_implementation: str) -> HFHandle:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        tokenizer.padding_side = "left"
        model = StandInChatModel(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
        return HFHandle(model=model, processor=None, tokenizer=tokenizer)


def test_medrega_builds_hermes_inputs_and_parses_its_answer(tmp_path: Path) -> None:
    settings = ModelSettings(family="medrega", path=medrega_checkpoint(tmp_path), trust_remote_code=True)
    adapter = StandInMedRegA(settings)
    backend = TransformersBackend(adapter, settings, "cpu")
    backend.load()
    image = load_image(corpus_file("RG1_UNCI.dcm"))
    item = adapter.prepare(image, TaskRequest(Profile.GROUNDED_REPORT))
    assert item.max_new_tokens == 400  # the profile's cap, as MedRegA's demo
    assert backend.handle is not None
    rendered = adapter.hf_render(backend.handle, item)
    assert rendered == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
        "You are a helpful medical assistant. Your task is report phrase grounding. You are given a chest x-ray "
        "image, and you are required to locate the region and generate a report for the given organ. The region is "
        "represented in the form of bounding box, [x1, y1, x2, y2], with integers ranging from 0 to 999. These "
        "values correspond to the top left x, top left y, bottom right x, and bottom right y. For each object, "
        'please utilize this format to represent the region with its bounding box: "<ref>object</ref><box>[[x1, '
        'y1, x2, y2]]</box>". <image>\nPlease locate the region and describe the condition of <ref>right lung</ref>, '
        "<ref>left lung</ref><|im_end|><|im_start|>assistant\n"
    )
    (text,) = backend.generate([item])
    call = backend.handle.model.calls[0]
    assert call["pixel_values"].shape == (1, 3, 448, 448)
    expected_mean = (item.pixels.mean(axis=(0, 1)) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
    )
    assert np.allclose(call["pixel_values"][0].mean(dim=(1, 2)).numpy(), expected_mean, atol=1e-4)
    tokenizer = backend.handle.tokenizer
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((call["input_ids"] == context).sum()) == StandInChatModel.num_image_token
    assert call["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert call["do_sample"] is False and call["max_new_tokens"] == 400
    answer = adapter.parse(text, item)
    (finding,) = answer.findings
    assert finding.label == "right lung" and finding.text == "No effusion."
    assert finding.box is not None
    assert finding.box.as_list() == pytest.approx(
        [102 / 999 * 1841, 106 / 999 * 1955, 481 / 999 * 1841, 910 / 999 * 1955]
    )


def test_medrega_chinese_prompt_is_the_published_one(tmp_path: Path) -> None:
    adapter = MedRegAAdapter(ModelSettings(family="medrega", path=tmp_path, trust_remote_code=True))
    image = load_image(corpus_file("693_UNCI.dcm"))
    item = adapter.prepare(image, TaskRequest(Profile.GROUNDED_REPORT, Language.CHINESE, ("胰腺癌",)))
    assert item.prompt.text == (
        "你是一个医疗助手，你的任务是定位并描述病种。病种区域用边界框的形式表示，[x1, y1, x2, y2]，整数范围从0到999。"
        "这些值分别对应左上角的x，左上角的y，右下角的x和右下角的y。对于每个病种，请使用这种格式用边界框表示区域："
        '"<ref>病种</ref><box>[[x1, y1, x2, y2]]</box>：诊断"。<image>\n请定位并描述这张医学影像中的<ref>胰腺癌</ref>'
    )
    vqa = adapter.prepare(
        image,
        TaskRequest(
            Profile.VQA, question="What does this image show? Answer the question using a single word or phrase."
        ),
    )
    assert vqa.prompt.text == (
        "You are a helpful medical assistant. You are required to answer the question based on the medical image. "
        "<image>\nWhat does this image show? Answer the question using a single word or phrase."
    )
    report = adapter.prepare(image, TaskRequest(Profile.GROUNDED_REPORT, Language.ENGLISH))
    assert "Your task is report generation. You are given a CT image" in report.prompt.text  # no targets on CT


# --------------------------------------------------------------------------------------------------------------
# Checkpoint checks and offline loading
# --------------------------------------------------------------------------------------------------------------
def test_missing_directory_names_the_path_and_the_files(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelLoadError) as excinfo:
        Engine.load(ModelSettings(family="qwen2_5_vl", path=missing))
    message = str(excinfo.value)
    assert str(missing) in message and "config.json" in message and "model.safetensors" in message


def test_wrong_directory_lists_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"missing weights \(one of model\.safetensors") as excinfo:
        Engine.load(ModelSettings(family="internvl", path=tmp_path))
    assert "tokenizer" in str(excinfo.value) and "image processor" in str(excinfo.value)


def test_remote_code_only_when_the_config_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        Engine.load(ModelSettings(family="medrega", path=medrega_checkpoint(tmp_path)))


def test_unknown_family_and_backend(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model family 'llava'.*medrega"):
        Engine.load(ModelSettings(family="llava", path=tmp_path))
    with pytest.raises(ModelLoadError, match=r"unknown model backend 'vllm': expected one of .*onnxruntime.*tensorrt"):
        Engine.load(ModelSettings(family="qwen3_vl", path=tmp_path, backend="vllm"))


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValidationError, match=r"model\.path is required for family 'medgemma'"):
        ModelSettings(family="medgemma")
    with pytest.raises(ValidationError, match="cuda:N"):
        ModelSettings(device="gpu0")
    with pytest.raises(ValidationError):
        ModelSettings(familly="demo")  # type: ignore[call-arg]


def test_corrupt_weights_are_a_load_error(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint("qwen3_vl"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=str(broken)):
        Engine.load(ModelSettings(family="qwen3_vl", path=broken))


def test_importing_the_library_imports_no_torch() -> None:
    code = (
        "import sys, inference, inference.config, inference.errors, inference.registry, inference.engine; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------------------------
# Regions from GSPS / SR, and region_to_text through the engine
# --------------------------------------------------------------------------------------------------------------
def gsps_for(image: Dataset, points: list[float], graphic_type: str = "POLYLINE") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.GrayscaleSoftcopyPresentationStateStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = image.StudyInstanceUID
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "PR"
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    graphic = Dataset()
    graphic.GraphicAnnotationUnits = "PIXEL"
    graphic.GraphicDimensions = 2
    graphic.NumberOfGraphicPoints = len(points) // 2
    graphic.GraphicData = points
    graphic.GraphicType = graphic_type
    annotation = Dataset()
    annotation.ReferencedImageSequence = DicomSequence([ref])
    annotation.GraphicLayer = "MARKS"
    annotation.GraphicObjectSequence = DicomSequence([graphic])
    ds.GraphicAnnotationSequence = DicomSequence([annotation])
    return ds


def test_region_from_gsps_polyline_and_circle() -> None:
    image = pydicom.dcmread(corpus_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    region = region_from_dataset(
        gsps_for(image, [100.0, 200.0, 300.0, 200.0, 300.0, 400.0, 100.0, 400.0, 100.0, 200.0])
    )
    assert region is not None and region.box == BoundingBox(100, 200, 300, 400)
    assert region.ref is not None and region.ref.sop_instance_uid == image.SOPInstanceUID
    circle = region_from_dataset(gsps_for(image, [500.0, 500.0, 530.0, 540.0], "CIRCLE"))
    assert circle is not None and circle.box == BoundingBox(450, 450, 550, 550)


def test_region_from_sr_scoord() -> None:
    image_item = Dataset()
    image_item.ValueType = "IMAGE"
    sop = Dataset()
    sop.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    sop.ReferencedSOPInstanceUID = "1.2.3.4"
    sop.ReferencedFrameNumber = 7
    image_item.ReferencedSOPSequence = DicomSequence([sop])
    scoord = Dataset()
    scoord.ValueType = "SCOORD"
    scoord.GraphicType = "POLYLINE"
    scoord.GraphicData = [10.0, 20.0, 40.0, 20.0, 40.0, 60.0, 10.0, 60.0, 10.0, 20.0]
    scoord.ContentSequence = DicomSequence([image_item])
    group = Dataset()
    group.ValueType = "CONTAINER"
    group.ContentSequence = DicomSequence([scoord])
    sr = Dataset()
    sr.ContentSequence = DicomSequence([group])
    region = region_from_dataset(sr)
    assert region is not None and region.box == BoundingBox(10, 20, 40, 60)
    assert region.ref is not None and (region.ref.sop_instance_uid, region.ref.frame_number) == ("1.2.3.4", 7)


def test_region_to_text_reads_the_gsps_of_the_study(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    engine = Engine.load(
        ModelSettings(family="qwen2_5_vl", path=tiny_checkpoint("qwen2_5_vl"), max_new_tokens=4, max_image_side=128)
    )
    cr = corpus_file("RG1_UNCI.dcm")
    image = pydicom.dcmread(cr, stop_before_pixels=True)
    gsps = gsps_for(image, [100.0, 200.0, 300.0, 200.0, 300.0, 400.0, 100.0, 400.0])
    gsps.file_meta = pydicom.dataset.FileMetaDataset()
    gsps.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    gsps.file_meta.MediaStorageSOPClassUID = gsps.SOPClassUID
    gsps.file_meta.MediaStorageSOPInstanceUID = gsps.SOPInstanceUID
    path = tmp_path / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    other = corpus_file("MR2_UNCI.dcm")  # another image of the "study": not the one the region points at
    result = engine.run_study([other, path, cr], "region_to_text")
    for finding in result.findings:  # the random model may say nothing; what it says is about that region
        assert finding.box == BoundingBox(100, 200, 300, 400)
        assert finding.source is not None and finding.source.sop_instance_uid == image.SOPInstanceUID
    with pytest.raises(PoisonInputError, match="needs a region"):
        engine.run_study([cr], "region_to_text")
    with pytest.raises(PoisonInputError, match="no image"):
        engine.run_study([path], "grounded_report")


def test_compose_report_splits_findings_and_impression() -> None:
    english = compose_report(["Findings: Clear lungs. Impression: Normal chest.", ""], Language.ENGLISH)
    assert (english.findings, english.impression) == ("Clear lungs.", "Normal chest.")
    chinese = compose_report(["影像诊断：双肺纹理清晰。影像结论：未见异常。"], Language.CHINESE)
    assert (chinese.findings, chinese.impression) == ("双肺纹理清晰。", "未见异常。")
