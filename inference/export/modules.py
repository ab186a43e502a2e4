"""The torch modules that are exported as graphs, and the plan an adapter gives the exporter.

Every family is split the same way (see ``shared/reference``: one graph per part, the weights stored once):

* ``vision``: pixel values (and whatever the family's vision tower needs) -> image features, one row per image
  token, already projected into the decoder's embedding space;
* ``embed``: token ids -> token embeddings (the image-token rows are replaced by the image features on the host);
* ``decoder``: embeddings, the new tokens' padding mask, positions, and the preallocated KV buffers of every layer
  (read only) -> the last position's logits and the keys and values of the new tokens alone. The caller writes
  those into its buffers at the new tokens' slots: no step copies the cache (see :func:`buffer_attention`). With
  empty buffers it is the prefill, with one new token a decode step: one graph, one copy of the weights.

This module imports torch and transformers: only the exporter imports it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
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
    "buffer_attention",
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


#: The attention implementation name the decoder graph runs its language model with.
BUFFER_ATTENTION = "kv_buffer"


@dataclass
class _Buffers:
    """The KV buffers and slot bookkeeping of one decoder forward, for :func:`buffer_attention`."""

    keys: Sequence[torch.Tensor]  # per layer (batch, kv_heads, capacity, head_dim)
    values: Sequence[torch.Tensor]
    filled: torch.Tensor  # (batch, capacity) bool: the slot holds a real (not padding) token
    cache_position: torch.Tensor  # (seq,) int64: the slots the new tokens will take
    biases: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window

    def bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 1, seq, capacity) additive mask of the buffer slots the new tokens may attend to."""
        if window not in self.biases:
            slots = torch.arange(self.filled.shape[1], device=self.filled.device)
            visible = self.filled[:, None, :] & (slots[None, :] < self.cache_position[:, None])[None]
            if window is not None:
                visible = visible & ((self.cache_position[:, None] - slots[None, :]) < window)[None]
            self.biases[window] = torch.where(visible[:, None], 0.0, torch.finfo(dtype).min).to(dtype)
        return self.biases[window]


_ACTIVE: list[_Buffers] = []


def buffer_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, softcap: float | None = None,
                     **_: Any) -> tuple[torch.Tensor, None]:
    """Attention over the preallocated buffer of earlier tokens and the new tokens' own keys, without joining them.

    ``key``/``value`` are the new tokens' only (the cache of :class:`_NewTokensCache` returns them unchanged);
    ``attention_mask`` is transformers' own mask among the new tokens (causal, padding, sliding window, Gemma 3's
    bidirectional image blocks), built as if the cache were empty. The buffer part is masked by which slots are
    filled, lie before the new tokens, and fall inside the layer's sliding window. One softmax over both parts
    gives exactly the attention over the joined sequence; query heads are grouped per KV head, so no buffer is
    copied per step (not even for grouped-query attention).
    """
    buffers = _ACTIVE[-1]
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    past_k, past_v = buffers.keys[layer], buffers.values[layer]
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, groups * seq, dim)
    past_scores = (q @ past_k.transpose(2, 3)) * scale  # (batch, kv, groups * seq, capacity)
    new_scores = (q @ key.transpose(2, 3)) * scale  # (batch, kv, groups * seq, seq)
    if softcap is not None:
        past_scores = torch.tanh(past_scores / softcap) * softcap
        new_scores = torch.tanh(new_scores / softcap) * softcap
    capacity = past_k.shape[2]
    past_bias = buffers.bias(sliding_window, past_scores.dtype)
    past_scores = (past_scores.reshape(batch, kv_heads, groups, seq, capacity) + past_bias[:, :, None])
    new_scores = new_scores.reshape(batch, kv_heads, groups, seq, seq)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :seq]
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(new_scores.dtype).min).to(new_scores.dtype)
        new_scores = new_scores + mask[:, :, None]
    weights = torch.softmax(torch.cat([past_scores, new_scores], dim=-1), dim=-1, dtype=torch.float32)
    weights = weights.to(query.dtype).reshape(batch, kv_heads, groups * seq, capacity + seq)
    out = weights[..., :capacity] @ past_v + weights[..., capacity:] @ value
    return out.reshape(batch, heads, seq, dim).transpose(1, 2).contiguous(), None


def _register_buffer_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(BUFFER_ATTENTION, buffer_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(BUFFER_ATTENTION, eager_mask)


def _new_tokens_cache(layers: int) -> Any:
    """A transformers cache that records each layer's new keys and values and reports itself empty, so the model
    builds its masks and positions among the new tokens only (relative, which is all a mask needs)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class NewTokensLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys, self.values, self.is_initialized = key_states, value_states, True
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, 0

    return Cache(layers=[NewTokensLayer() for _ in range(layers)])


@contextlib.contextmanager
def _attention_of(config: Any, name: str) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


class TextDecoder(torch.nn.Module):
    """A decoder-only language model with its LM head, run on preallocated KV buffers (:func:`buffer_attention`).

    Inputs: ``inputs_embeds``, ``attention_mask`` (the new tokens' padding, ``(batch, seq)``), ``position_ids``,
    ``cache_position`` (the buffer slot each new token will take, ``(seq,)``), ``cache_filled`` (``(batch,
    capacity)``, 1 where a slot holds a real token), the buffers ``cache_key_<i>``/``cache_value_<i>`` and the
    ``extra_names`` (further keyword inputs of the language model, e.g. Gemma 3's ``token_type_ids``). Outputs: the
    last position's logits and ``new_key_<i>``/``new_value_<i>`` of the new tokens.
    """

    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, layers: int, text_config: Any,
                 extra_names: Sequence[str] = ()) -> None:
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.layers = layers
        self.text_config = text_config
        self.extra_names = tuple(extra_names)
        # transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns until it is removed).
        parameters = inspect.signature(language_model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        _register_buffer_attention()

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor, cache_filled: torch.Tensor, *rest: torch.Tensor,
                ) -> tuple[torch.Tensor, ...]:
        buffers, extras = rest[: 2 * self.layers], rest[2 * self.layers :]
        cache = _new_tokens_cache(self.layers)
        _ACTIVE.append(_Buffers(buffers[0::2], buffers[1::2], cache_filled != 0, cache_position))
        try:
            with _attention_of(self.text_config, BUFFER_ATTENTION):
                out = self.language_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{self.cache_argument: cache},
                    **dict(zip(self.extra_names, extras, strict=True)),
                )
        finally:
            _ACTIVE.pop()
        logits = self.lm_head(out.last_hidden_state[:, -1, :])
        new: list[torch.Tensor] = []
        for layer in cache.layers[: self.layers]:
            new += [layer.keys, layer.values]
        return (logits, *new)


def embed_spec(embedding: torch.nn.Module) -> GraphSpec:
    """The ``embed`` graph of an embedding module."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ids = torch.zeros(2, 5, dtype=torch.int64)
    return GraphSpec(
        "embed", TokenEmbedding(embedding), (ids,), ["input_ids"], ["inputs_embeds"],
        {"input_ids": {0: batch, 1: seq}}, checks=[(torch.ones(3, 1, dtype=torch.int64),)],
    )


def decoder_spec(language_model: torch.nn.Module, lm_head: torch.nn.Module, layout: DecoderLayout,
                 dtype: torch.dtype, text_config: Any,
                 extras: Sequence[tuple[str, torch.Tensor, dict[int, str]]] = ()) -> GraphSpec:
    """The ``decoder`` graph: ``(inputs_embeds, attention_mask, position_ids, cache_position, cache_filled,
    buffers..., extras...)`` (see :class:`TextDecoder`).

    ``extras``: (name, example for batch 2 and sequence 5, dynamic axes by dim name: ``{0: "batch", 1: "seq"}``;
    a name other than batch, seq and capacity is a dimension of its own).
    """
    dim_names = {"batch", "seq", "capacity", *(name for e in extras for name in e[2].values())}
    dims = {n: torch.export.Dim(n) for n in sorted(dim_names)}
    batch, seq, capacity = dims["batch"], dims["seq"], dims["capacity"]

    def example(b: int, s: int, filled: int, free: int, extra_values: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """Inputs for ``b`` rows of ``s`` new tokens after ``filled`` buffer slots (the first one padding in row 0),
        in buffers of ``filled + free`` slots (whose free slots hold noise the graph must ignore)."""
        embeds = torch.randn(b, s, layout.hidden_size, dtype=dtype)
        mask = torch.ones(b, s, dtype=torch.int64)
        positions = torch.arange(filled, filled + s)[None].repeat(b, 1)
        if layout.position_rows > 1:
            positions = positions[None].repeat(layout.position_rows, 1, 1)
        slots = torch.arange(filled, filled + s)
        occupied = torch.zeros(b, filled + free, dtype=torch.int64)
        occupied[:, :filled] = 1
        if filled:
            occupied[0, 0] = 0
        shape = (b, layout.kv_heads, filled + free, layout.head_dim)
        cache = [torch.randn(shape, dtype=dtype) for _ in range(2 * layout.layers)]
        return (embeds, mask, positions, slots, occupied, *cache, *extra_values)

    position_axes: dict[int, Any] = {0: batch, 1: seq} if layout.position_rows == 1 else {1: batch, 2: seq}
    names = ["inputs_embeds", "attention_mask", "position_ids", "cache_position", "cache_filled",
             *layout.cache_names(), *(e[0] for e in extras)]
    dynamic: dict[str, Any] = {
        "inputs_embeds": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: seq},
        "position_ids": position_axes,
        "cache_position": {0: seq},
        "cache_filled": {0: batch, 1: capacity},
        "rest": tuple(
            [{0: batch, 2: capacity}] * (2 * layout.layers)
            + [{axis: dims[name] for axis, name in e[2].items()} for e in extras]
        ),
    }
    module = TextDecoder(language_model, lm_head, layout.layers, text_config, [e[0] for e in extras])
    extra_values = [e[1] for e in extras]
    # A decode step of 3 rows (one new token after 6 filled slots of 9) must run too: the axes stayed dynamic.
    # Its extras have 3 rows, one position, and no rows along their own axes (no image token in a decode step).
    step_sizes = {"batch": 3, "seq": 1}
    step_extras = [
        torch.zeros([step_sizes.get(axes.get(i, ""), 0) if i in axes else n for i, n in enumerate(value.shape)],
                    dtype=value.dtype)
        for _, value, axes in extras
    ]
    return GraphSpec(
        "decoder", module, example(2, 5, 3, 2, extra_values), names, ["logits", *layout.new_names()], dynamic,
        checks=[example(3, 1, 6, 3, step_extras)],
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
    decoder = decoder_spec(decoder_module, model.lm_head, layout, dtype, config.text_config, extras)
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
