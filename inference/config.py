"""Settings of the model a worker serves: the ``model:`` section of the node's configuration tree."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ModelSettings", "WindowName"]

#: Which VOI window a grey-scale image gets. ``auto``: the header's first window (or VOI LUT) when there is one,
#: else the modality default (CT: soft tissue); ``header``: the header's window, else the full pixel range; a
#: preset name (CT presets in Hounsfield units) forces that window on CT and falls back to ``auto`` elsewhere.
WindowName = Literal["auto", "header", "full_range", "lung", "soft_tissue", "bone", "brain", "liver"]


class ModelSettings(BaseModel):
    """Which model to load, where from, on which device, and how to feed it."""

    model_config = ConfigDict(extra="forbid")

    family: str = Field(
        "demo", description="registry key: demo | medrega | internvl | qwen2_5_vl | qwen3_vl | medgemma"
    )
    path: Path | None = Field(
        None,
        description="local checkpoint directory; None only for family 'demo' (the packaged demo checkpoint)",
    )
    backend: str = Field(
        "transformers",
        description="registry key of the runtime: transformers | onnxruntime | tensorrt (the last two run the "
        "checkpoint's ONNX export, made by `dicom-node model export`)",
    )
    export_dir: Path | None = Field(
        None,
        description="where ONNX exports (and TensorRT engines) live, one folder per checkpoint version; "
        "None: <node.data_dir>/model-exports",
    )
    max_sequence_length: int = Field(
        4096, ge=64, description="tensorrt: longest prompt + answer in tokens its engines are built for"
    )
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'; `dicom-node worker --device` overrides")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    trust_remote_code: bool = Field(
        False, description="run the checkpoint's own modelling code; only families that need it (medrega)"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="None: each profile's own cap")
    batch_size: int = Field(
        8, ge=1, description="most images per generate call, gathered across the studies a worker holds"
    )
    batch_wait_ms: float = Field(
        20, ge=0, le=10000,
        description="how long a batch waits after its first image for others to join (ms); 0: never waits",
    )
    slices_per_series: int = Field(3, ge=1, description="CT/MR: evenly spaced slices taken from each series")
    max_images_per_study: int = Field(8, ge=1, description="upper bound of images sent to the model per study")
    window: WindowName = Field("auto", description="VOI window of grey-scale images (CT presets: lung, ...)")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="attention kernel; auto: flash attention where flash-attn is installed on CUDA, else SDPA"
    )
    compile: bool = Field(
        False,
        description="transformers backend: a static KV cache and torch.compile (CUDA graphs on a GPU); the first "
        "batches of each shape compile, later ones run faster",
    )
    max_image_side: int = Field(
        1024,
        ge=64,
        description="grey-scale/colour images are down-sampled to at most this side before the adapter",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"model.device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")

    @model_validator(mode="after")
    def _check_path(self) -> ModelSettings:
        if self.path is None and self.family != "demo":
            raise ValueError(
                f"model.path is required for family {self.family!r} (only family 'demo' has a packaged checkpoint)"
            )
        return self
