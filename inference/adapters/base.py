"""The adapter base class: what every model family provides to the engine and the backends.

An adapter owns everything model-specific (DESIGN invariant 7, STYLE "no if/elif over family names"):

* **checkpoint**: which files a checkpoint directory must hold (:attr:`ModelAdapter.required_files`), its
  fingerprint (the model version recorded in the SR and in result UIDs);
* **pre-process**: :meth:`ModelAdapter.prepare_image` resizes/pads the display-ready :class:`ModelImage` into
  the geometry the model was trained on and records it in an :class:`ImageTransform`;
  :meth:`ModelAdapter.build_prompt` writes the family's prompt for a :class:`TaskRequest`;
* **box numbers**: :attr:`ModelAdapter.box_space` says what the numbers in the family's prompts and answers mean;
* **post-process**: :meth:`ModelAdapter.parse` turns one answer into findings in source pixel space (never raises);
* **runtime hooks** per backend: for the ``transformers`` backend the ``hf_*`` methods below (load, encode a
  batch, decode). The defaults fit Hugging Face image-text-to-text checkpoints (AutoProcessor +
  AutoModelForImageTextToText + chat template); families override what differs.

Writing a new adapter (the demo model's, for instance): subclass :class:`ModelAdapter` (or an existing family,
e.g. ``MedRegAAdapter`` when the answers use ``<ref>/<box>`` tags), set :attr:`family` and :attr:`box_space`,
implement the three abstract methods, override the ``hf_*`` hooks the checkpoint needs, and add
``"family": "module:Class"`` to :data:`inference.registry.ADAPTERS`. Reusable pieces:
:func:`inference.parsing.parse_ref_boxes`, :func:`inference.parsing.parse_ref_box_answer`,
:func:`inference.parsing.format_ref_box`, :func:`inference.parsing.parse_json_boxes`,
:func:`inference.parsing.regions_to_findings`, :func:`inference.profiles.default_max_new_tokens`.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from inference.config import ModelSettings
from inference.errors import ModelLoadError
from inference.geometry import ImageTransform
from inference.parsing import BoxSpace
from inference.profiles import default_max_new_tokens
from inference.types import GraphInputs, ModelImage, ParsedAnswer, PreparedInput, Profile, Prompt, TaskRequest
from sr_writer.findings import AlgorithmIdentity

__all__ = ["HFHandle", "ModelAdapter", "WeightFiles", "checkpoint_fingerprint", "read_chat_template"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFiles:
    """One requirement on a checkpoint directory: at least one of ``names`` must exist (``what`` explains it)."""

    what: str
    names: tuple[str, ...]

    def present(self, directory: Path) -> bool:
        return any((directory / name).is_file() for name in self.names)


#: What a Hugging Face checkpoint holds: config, weights, tokenizer, image processor.
HF_CHECKPOINT_FILES: tuple[WeightFiles, ...] = (
    WeightFiles("model configuration", ("config.json",)),
    WeightFiles(
        "weights",
        (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        ),
    ),
    WeightFiles("tokenizer", ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")),
    WeightFiles("image processor", ("preprocessor_config.json", "processor_config.json")),
)


@dataclass
class HFHandle:
    """What the transformers backend holds for one loaded checkpoint.

    ``processor`` is the image processor for the default hooks (an adapter may keep a full processor there).
    """

    model: Any
    processor: Any
    tokenizer: Any
    extras: dict[str, Any] = field(default_factory=dict)
    #: The checkpoint's configuration; the model's own when a model is loaded. The graph backends (onnxruntime,
    #: tensorrt) hold a handle without a torch model: the hooks read ``handle.config``, never ``handle.model``.
    model_config: Any = None

    @property
    def config(self) -> Any:
        return self.model.config if self.model is not None else self.model_config


def checkpoint_fingerprint(directory: Path) -> str:
    """A short, stable hash of a checkpoint directory, cheap even for 80 GB of weights.

    Small files (config, tokenizer, processor, weight index: under 8 MiB) are hashed whole; large weight files
    by name, size and their first and last MiB (a fine-tune rewrites both the safetensors header and its
    tensors).
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and ".cache" not in p.parts):
        rel = path.relative_to(directory).as_posix()
        size = path.stat().st_size
        digest.update(f"{rel}\x1f{size}\x1f".encode())
        with path.open("rb") as fh:
            if size <= 8 << 20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read())
    return digest.hexdigest()[:16]


class ModelAdapter(ABC):
    """Model-specific pre-processing, prompting and parsing for one family (see the module docstring)."""

    #: The registry key (``model.family``).
    family: ClassVar[str] = ""
    #: Files the checkpoint directory must hold; checked before anything heavy is imported.
    required_files: ClassVar[tuple[WeightFiles, ...]] = HF_CHECKPOINT_FILES
    #: True when the checkpoint ships its own modelling code (loading then needs ``trust_remote_code: true``).
    needs_remote_code: ClassVar[bool] = False
    #: The coordinate space of the box numbers in the family's prompts and answers: relative to the model-input
    #: image on 0..``scale`` (MedRegA and the demo model 0..999; InternVL3, Qwen3-VL and MedGemma 0..1000), or
    #: absolute pixels of the model-input image (``scale=None``: Qwen2.5-VL). :meth:`parse` maps answers' boxes
    #: from it to source pixels and :meth:`build_prompt` writes a request's region in it, so the coordinate system
    #: never leaves the adapter (DESIGN invariant 7). Every adapter sets it.
    box_space: ClassVar[BoxSpace]

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    # -- checkpoint --
    def checkpoint_dir(self) -> Path:
        """The directory the weights load from (``model.path``; the demo adapter supplies its packaged one)."""
        if self.settings.path is None:
            raise ModelLoadError(f"model.path is required for family {self.family!r}, got None")
        return Path(self.settings.path).expanduser()

    def check_checkpoint(self) -> Path:
        """The checkpoint directory, after checking it exists and holds :attr:`required_files`."""
        directory = self.checkpoint_dir()
        expected = "; ".join(f"{req.what}: one of {', '.join(req.names)}" for req in self.required_files)
        if not directory.is_dir():
            raise ModelLoadError(
                f"model.path {str(directory)!r} for family {self.family!r} is not a directory; "
                f"expected a checkpoint directory holding {expected}"
            )
        missing = [req for req in self.required_files if not req.present(directory)]
        if missing:
            lacking = "; ".join(f"{req.what} (one of {', '.join(req.names)})" for req in missing)
            raise ModelLoadError(
                f"model.path {str(directory)!r} is not a {self.family!r} checkpoint: missing {lacking}; "
                f"expected {expected}"
            )
        if self.needs_remote_code and not self.settings.trust_remote_code:
            raise ModelLoadError(
                f"family {self.family!r} loads the modelling code shipped in {str(directory)!r}; set "
                "model.trust_remote_code: true to allow it (it is never enabled implicitly)"
            )
        return directory

    def identity(self, directory: Path) -> AlgorithmIdentity:
        """Who produces the findings: family, checkpoint name and fingerprint (the version)."""
        return AlgorithmIdentity(
            name=directory.name or self.family,
            version=checkpoint_fingerprint(directory),
            family=self.family,
            parameters={"decoding": "greedy"},
        )

    # -- pre-process --
    def max_new_tokens(self, profile: Profile) -> int:
        """The generation cap for ``profile``: ``model.max_new_tokens`` when set, else the profile's own."""
        return self.settings.max_new_tokens or default_max_new_tokens(profile)

    @abstractmethod
    def prepare_image(self, image: ModelImage) -> tuple[np.ndarray, ImageTransform]:
        """The uint8 RGB image the processor receives and the transform from the source image to it."""

    @abstractmethod
    def build_prompt(self, request: TaskRequest, transform: ImageTransform) -> Prompt:
        """The family's prompt for ``request`` (``transform`` converts a request region into model numbers)."""

    def prepare(self, image: ModelImage, request: TaskRequest) -> PreparedInput:
        """Pre-process one image for one request."""
        pixels, transform = self.prepare_image(image)
        if pixels.shape[:2] != (transform.output_size[1], transform.output_size[0]):
            raise AssertionError(
                f"{type(self).__name__}.prepare_image returned pixels {pixels.shape[:2]} but a transform to "
                f"{transform.output_size[::-1]} (rows, columns)"
            )
        if not request.modality and image.modality:
            request = replace(request, modality=image.modality)
        prompt = self.build_prompt(request, transform)
        return PreparedInput(image, request, pixels, transform, prompt, self.max_new_tokens(request.profile))

    # -- post-process --
    @abstractmethod
    def parse(self, text: str, item: PreparedInput) -> ParsedAnswer:
        """Findings (source pixel space, ``item.image.ref``) and narrative from one answer; never raises."""

    # -- transformers backend hooks --
    # The default hooks load the tokenizer, the image processor and the model separately (not the multimodal
    # ``AutoProcessor``: for Qwen-VL and InternVL it also builds a video processor, which needs torchvision), render
    # the checkpoint's own chat template, and expand the image placeholder into the family's image tokens
    # (:meth:`hf_expand_image_tokens`), exactly as the family's processor does.
    def hf_model_class(self) -> Any:
        """The transformers auto class (or model class) the weights load with."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def hf_load_preprocessing(self, directory: Path) -> HFHandle:
        """Tokenizer, image processor, chat template and configuration from ``directory``, without the model."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        trust = bool(self.needs_remote_code and self.settings.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust)
        tokenizer.padding_side = "left"  # batched generation appends on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True, trust_remote_code=trust)
        return HFHandle(
            model=None,
            processor=image_processor,
            tokenizer=tokenizer,
            extras={"chat_template": read_chat_template(directory)},
            model_config=AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust),
        )

    def hf_load(self, directory: Path, device: str, dtype: Any, attn_implementation: str) -> HFHandle:
        """Load tokenizer, image processor and model from ``directory`` (local files only) onto ``device``."""
        handle = self.hf_load_preprocessing(directory)
        trust = bool(self.needs_remote_code and self.settings.trust_remote_code)
        model = self.hf_model_class().from_pretrained(
            directory,
            local_files_only=True,
            trust_remote_code=trust,
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
        model.to(device).eval()
        handle.model = model
        return handle

    def hf_messages(self, item: PreparedInput) -> list[dict[str, Any]]:
        """The chat messages of one item in content-list form (the image at the placeholder)."""
        before, after = item.prompt.split_at_image()
        content: list[dict[str, Any]] = []
        if before.strip():
            content.append({"type": "text", "text": before.rstrip("\n ")})
        content.append({"type": "image"})
        if after.strip():
            content.append({"type": "text", "text": after})
        messages: list[dict[str, Any]] = []
        if item.prompt.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": item.prompt.system}]})
        messages.append({"role": "user", "content": content})
        return messages

    def hf_render(self, handle: HFHandle, item: PreparedInput) -> str:
        """The prompt text of one item through the checkpoint's chat template (one image placeholder)."""
        text = handle.tokenizer.apply_chat_template(
            self.hf_messages(item),
            chat_template=handle.extras.get("chat_template"),
            add_generation_prompt=True,
            tokenize=False,
        )
        return str(text)

    def hf_images(self, batch: Sequence[PreparedInput]) -> list[Any]:
        """The images of a batch as PIL images (one per item)."""
        from PIL import Image

        return [Image.fromarray(item.pixels) for item in batch]

    def hf_image_inputs(self, handle: HFHandle, batch: Sequence[PreparedInput]) -> dict[str, Any]:
        """The image processor's output for a batch (pixel values and whatever the family adds)."""
        return dict(handle.processor(images=self.hf_images(batch), return_tensors="pt"))

    def hf_expand_image_tokens(self, handle: HFHandle, text: str, image_inputs: Mapping[str, Any], index: int) -> str:
        """``text`` with item ``index``'s image placeholder expanded into the family's image tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not expand image tokens for the transformers backend")

    def hf_model_inputs(
        self, handle: HFHandle, image_inputs: dict[str, Any], text_inputs: dict[str, Any]
    ) -> dict[str, Any]:
        """The keyword arguments of ``model.generate`` from the image and text inputs."""
        return {**text_inputs, **image_inputs}

    def hf_encode(self, handle: HFHandle, batch: Sequence[PreparedInput], device: str) -> Mapping[str, Any]:
        """Tensors for ``model.generate`` for a batch of prepared inputs, on ``device``."""
        import torch

        image_inputs = self.hf_image_inputs(handle, batch)
        texts = [
            self.hf_expand_image_tokens(handle, self.hf_render(handle, item), image_inputs, i)
            for i, item in enumerate(batch)
        ]
        text_inputs = dict(handle.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        inputs = self.hf_model_inputs(handle, image_inputs, text_inputs)
        dtype = getattr(handle.model, "dtype", None)
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if value.is_floating_point() and dtype is not None:
                    value = value.to(dtype)
            out[key] = value
        return out

    def hf_generate_kwargs(self, handle: HFHandle) -> dict[str, Any]:
        """Extra keyword arguments of ``model.generate`` (stop tokens, pad token)."""
        tokenizer = handle.tokenizer
        kwargs: dict[str, Any] = {}
        if tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        return kwargs

    def hf_new_tokens(self, sequences: Any, encoded: Mapping[str, Any]) -> Any:
        """The generated tokens of ``model.generate``'s output: what follows the prompt."""
        return sequences[:, encoded["input_ids"].shape[1] :]

    def hf_end_tokens(self, handle: HFHandle) -> list[int]:
        """The token ids that end an answer (the generation keyword arguments', else the checkpoint's)."""
        wanted = self.hf_generate_kwargs(handle).get("eos_token_id")
        if wanted is None:
            config = getattr(handle.model, "generation_config", None)
            wanted = getattr(config, "eos_token_id", None)
        if wanted is None:
            wanted = handle.tokenizer.eos_token_id
        values = wanted if isinstance(wanted, list | tuple) else [wanted]
        return [int(v) for v in values if v is not None]

    def hf_decode(self, handle: HFHandle, sequences: Any, encoded: Mapping[str, Any]) -> list[str]:
        """The answers' text: the generated tokens after the prompt, special tokens removed."""
        texts = handle.tokenizer.batch_decode(self.hf_new_tokens(sequences, encoded), skip_special_tokens=True)
        return [t.strip() for t in texts]


    # -- ONNX export and the graph backends (onnxruntime, tensorrt) --
    #: Why this family has no ONNX export yet ("" when :meth:`export_plan` is implemented).
    export_unsupported: ClassVar[str] = "its ONNX export is not implemented yet"

    def check_exportable(self) -> None:
        """Raise :class:`~inference.export.manifest.ExportUnsupportedError` (family and reason) when
        :attr:`export_unsupported` is set: the exporter and the graph backends call it before reading a file."""
        from inference.export.manifest import ExportUnsupportedError

        if self.export_unsupported:
            raise ExportUnsupportedError(
                f"family {self.family!r} cannot run on the onnxruntime or tensorrt backends: "
                f"{self.export_unsupported}; use model.backend: transformers"
            )

    def export_plan(self, handle: HFHandle) -> Any:
        """The graphs to export (an :class:`inference.export.modules.ExportPlan`) for a loaded checkpoint.

        Families that implement it split the model into ``vision``, ``embed`` and ``decoder`` graphs (see
        :mod:`inference.export.modules`) and set :attr:`export_unsupported` to ""; the default refuses, naming
        the family and the reason.
        """
        from inference.export.manifest import ExportUnsupportedError

        self.check_exportable()
        raise ExportUnsupportedError(f"family {self.family!r} has no ONNX export; use model.backend: transformers")

    def export_tokens(
        self, handle: HFHandle, batch: Sequence[PreparedInput]
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """The image processor's output, the token ids and the attention mask of a batch, as :meth:`hf_encode`."""
        image_inputs = self.hf_image_inputs(handle, batch)
        texts = [
            self.hf_expand_image_tokens(handle, self.hf_render(handle, item), image_inputs, i)
            for i, item in enumerate(batch)
        ]
        text_inputs = handle.tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
        ids = np.asarray(text_inputs["input_ids"], dtype=np.int64)
        mask = np.asarray(text_inputs["attention_mask"], dtype=np.int64)
        return image_inputs, ids, mask

    def export_encode(self, handle: HFHandle, batch: Sequence[PreparedInput]) -> GraphInputs:
        """A batch as the graphs' host inputs, built exactly as :meth:`hf_encode` builds the model's.

        The default fits a vision graph that takes the image processor's ``pixel_values`` for the whole batch and
        a decoder with 1-D positions (transformers' ``cumsum(attention_mask) - 1``, pads at 1).
        """
        image_inputs, ids, mask = self.export_tokens(handle, batch)
        positions = np.where(mask == 0, 1, mask.cumsum(axis=-1) - 1).astype(np.int64)
        pixels = np.asarray(image_inputs["pixel_values"], dtype=np.float32)
        return GraphInputs(ids, mask, positions, [{"pixel_values": pixels}])


def read_chat_template(directory: Path) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, ``chat_template.json``, else the tokenizer's."""
    import json

    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        try:
            value = json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str):
            return value
    return None
