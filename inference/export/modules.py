"""The torch modules that are exported as graphs, and the plan an adapter gives the exporter.

Every family is split the same way (see ``shared/reference``: one graph per part, the weights stored once):

* ``vision``: pixel values (and whatever the family's vision tower needs) -> image features, one row per image
  token, already projected into the decoder's embedding space;
* ``embed``: token ids -> token embeddings (the image-token rows are replaced by the image features on the host);
* ``decoder``: embeddings, attention mask, positions and the KV cache of every layer -> the last position's logits
  and the new KV cache. With an empty cache it is the prefill, with one new token a decode step: one graph, one
  copy of the weights.

This module imports torch and transformers: only the exporter imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference.export.manifest import DecoderLayout

__all__ = [
    "ExportPlan",
    "GraphSpec",
    "ImageFeatures",
    "LlavaVision",
    "TextDecoder",
    "TokenEmbedding",
    "decoder_spec",
    "embed_spec",
    "end_tokens",
    "image_batch_spec",
    "layout_of",
    "standard_plan",
]


@dataclass
class GraphSpec:
    """One graph to export: the module, example inputs, names and dynamic axes (``torch.export`` dims)."""

    name: str
    module: torch.nn.Module
    args: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: Any
    #: Other input sets (same names) the exported graph must reproduce: a batch size or image size not used for
    #: the export, so lost dynamic axes are found at export time, not in a worker.
    checks: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class ExportPlan:
    """What an adapter hands the exporter for one loaded checkpoint."""

    graphs: list[GraphSpec]
    decoder: DecoderLayout
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    #: (min, opt, max) of the vision graph's dynamic axes other than ``images`` (e.g. patch counts), for TensorRT.
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class TokenEmbedding(torch.nn.Module):
    """Token ids -> embeddings (a family's scaled embedding, e.g. Gemma's, is the module itself)."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)  # type: ignore[no-any-return]


class TextDecoder(torch.nn.Module):
    """A decoder-only language model with its LM head, the KV cache as plain tensors in and out.

    ``extra_names`` are further keyword inputs of the language model (Gemma 3's ``token_type_ids``), passed
    through by name after the cache tensors.
    """

    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, layers: int,
                 extra_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.layers = layers
        self.extra_names = tuple(extra_names)
        # transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns until it is removed).
        parameters = inspect.signature(language_model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        past, extras = rest[: 2 * self.layers], rest[2 * self.layers :]
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: cache},
            **dict(zip(self.extra_names, extras, strict=True)),
        )
        logits = self.lm_head(out.last_hidden_state[:, -1, :])
        present: list[torch.Tensor] = []
        returned = getattr(out, "cache", None) or out.past_key_values
        for layer in returned.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)


def embed_spec(embedding: torch.nn.Module) -> GraphSpec:
    """The ``embed`` graph of an embedding module."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ids = torch.zeros(2, 5, dtype=torch.int64)
    return GraphSpec(
        "embed", TokenEmbedding(embedding), (ids,), ["input_ids"], ["inputs_embeds"],
        {"input_ids": {0: batch, 1: seq}}, checks=[(torch.ones(3, 1, dtype=torch.int64),)],
    )


def decoder_spec(language_model: torch.nn.Module, lm_head: torch.nn.Module, layout: DecoderLayout,
                 dtype: torch.dtype, extras: Sequence[tuple[str, torch.Tensor, dict[int, str]]] = ()) -> GraphSpec:
    """The ``decoder`` graph: ``(inputs_embeds, attention_mask, position_ids, past..., extras...)``.

    ``extras``: (name, example for batch 2 and sequence 5, dynamic axes by dim name: ``{0: "batch", 1: "seq"}``;
    a name other than batch, seq, past and mask is a dimension of its own).
    """
    dim_names = {"batch", "seq", "past", "mask", *(name for e in extras for name in e[2].values())}
    dims = {n: torch.export.Dim(n) for n in sorted(dim_names)}
    batch, seq, past_len, mask_len = dims["batch"], dims["seq"], dims["past"], dims["mask"]
    b, s, p = 2, 5, 3
    embeds = torch.randn(b, s, layout.hidden_size, dtype=dtype)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    positions = torch.arange(p, p + s)[None].repeat(b, 1)
    position_axes: dict[int, Any] = {0: batch, 1: seq}
    if layout.position_rows > 1:
        positions = positions[None].repeat(layout.position_rows, 1, 1)
        position_axes = {1: batch, 2: seq}
    past = [torch.randn(b, layout.kv_heads, p, layout.head_dim, dtype=dtype) for _ in range(2 * layout.layers)]
    names = ["inputs_embeds", "attention_mask", "position_ids", *layout.past_names(), *(e[0] for e in extras)]
    dynamic: dict[str, Any] = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: mask_len},
        "position_ids": position_axes,
        "rest": tuple(
            [{0: batch, 2: past_len}] * (2 * layout.layers)
            + [{axis: dims[name] for axis, name in e[2].items()} for e in extras]
        ),
    }
    module = TextDecoder(language_model, lm_head, layout.layers, [e[0] for e in extras])
    return GraphSpec(
        "decoder", module, (embeds, mask, positions, *past, *(e[1] for e in extras)), names,
        ["logits", *layout.present_names()], dynamic,
    )



class LlavaVision(torch.nn.Module):
    """LLaVA's image path: vision tower, the configured hidden layer (CLS dropped for ``default``), projector.

    Calls the tower and the projector directly (``get_image_features`` splits the batch in Python, which freezes
    the batch axis at export). Output: one row per image token, ``(images * tokens, hidden)``.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        config = model.config
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = int(config.vision_feature_layer)
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[self.layer]
        if self.drop_cls:
            hidden = hidden[:, 1:]
        features = self.projector(hidden)
        return features.reshape(-1, features.shape[-1])  # type: ignore[no-any-return]


class ImageFeatures(torch.nn.Module):
    """A model's own ``get_image_features`` on a batch of images (or tiles) of one fixed size, when it is batched
    (no Python loop over the images): vision tower, feature selection and projector as the model runs them.

    ``options``: keyword arguments the model's forward would pass (InternVL's ``vision_feature_layer``).
    Output: one row per image token, ``(images * tokens, hidden)``.
    """

    def __init__(self, model: Any, **options: Any) -> None:
        super().__init__()
        self.model = model.model
        self.options = options

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values, return_dict=True, **self.options)
        features = out.pooler_output
        return features.reshape(-1, features.shape[-1])  # type: ignore[no-any-return]


def image_batch_spec(module: torch.nn.Module, channels: int, height: int, width: int,
                     dtype: torch.dtype) -> GraphSpec:
    """The ``vision`` graph of a module over ``(images, channels, height, width)`` pixel values of one size."""
    images = torch.export.Dim("images")
    return GraphSpec(
        "vision", module, (torch.randn(2, channels, height, width, dtype=dtype),), ["pixel_values"],
        ["image_features"], {"pixel_values": {0: images}},
        checks=[(torch.randn(3, channels, height, width, dtype=dtype),)],
    )


def layout_of(text_config: Any, position_rows: int = 1) -> DecoderLayout:
    """The KV-cache layout of a decoder configuration."""
    heads = int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads)
    return DecoderLayout(
        layers=int(text_config.num_hidden_layers),
        kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        hidden_size=int(text_config.hidden_size),
        position_rows=position_rows,
    )


def end_tokens(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The token ids that end an answer: the generation configuration's, else the tokenizer's end token."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    values = eos if isinstance(eos, list | tuple) else [eos]
    return tuple(int(v) for v in values if v is not None)


def standard_plan(model: Any, tokenizer: Any, vision: GraphSpec, dtype: torch.dtype,
                  position_rows: int = 1,
                  extras: Sequence[tuple[str, torch.Tensor, dict[int, str]]] = (),
                  language_model: torch.nn.Module | None = None) -> ExportPlan:
    """The plan of an image-text model whose ``model.model.language_model`` and ``model.lm_head`` are the decoder.

    ``language_model``: the module run on the embeddings instead (Gemma 3's whole ``model.model``, which builds the
    bidirectional image-token mask from ``token_type_ids`` before its language model).
    """
    config = model.config
    layout = layout_of(config.text_config, position_rows)
    decoder_module = model.model.language_model if language_model is None else language_model
    decoder = decoder_spec(decoder_module, model.lm_head, layout, dtype, extras)
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = config.image_token_index
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_tokens(model, tokenizer)[0]
    return ExportPlan(
        graphs=[vision, embed_spec(model.get_input_embeddings()), decoder],
        decoder=layout,
        image_token_id=int(image_token),
        eos_token_ids=end_tokens(model, tokenizer),
        pad_token_id=int(pad),
    )
