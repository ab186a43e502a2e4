"""The Qwen-VL vision encoders as exportable modules: one image per run, the data-dependent parts from the host.

transformers' Qwen2.5-VL vision tower computes its window order and its attention segments from
``grid_thw.tolist()`` and splits the attention by ``cu_seqlens.tolist()``: both freeze at export. Here the host
computes them for each image (:mod:`inference.adapters.qwen_graphs`, numpy) and the graph receives

* the patches already in window order (``pixel_values``), their (row, column) patch positions in the same order
  (``position_ids``, for the rotary embedding),
* ``window_mask``: the block-diagonal mask of the window-attention blocks (True where two patches share a window;
  the full-attention blocks attend over the whole image, which is one segment when images run one at a time),
* ``reverse_index``: the permutation that puts the merged features back in raster order.

This module imports torch and transformers: only the exporter imports it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["DeepstackLanguageModel", "Qwen3Vision", "Qwen25Vision", "dense_deepstack", "vision_attention"]


def vision_attention(attn: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """A Qwen vision attention layer over one image's patches ``(patches, width)``, ``mask`` None: all pairs."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    length = hidden.shape[0]
    query, key, value = attn.qkv(hidden).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling)
    return attn.proj(out.squeeze(0).transpose(0, 1).reshape(length, -1))  # type: ignore[no-any-return]


class Qwen25Vision(torch.nn.Module):
    """Qwen2.5-VL's vision tower and patch merger for one image; output ``(tokens, hidden)`` in raster order."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.visual = model.model.visual
        self.full_blocks = frozenset(int(i) for i in self.visual.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, window_mask: torch.Tensor,
                reverse_index: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        for index, block in enumerate(visual.blocks):
            mask = None if index in self.full_blocks else window_mask[None, None]
            hidden = hidden + vision_attention(block.attn, block.norm1(hidden), cos, sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = visual.merger(hidden)
        return merged[reverse_index]  # type: ignore[no-any-return]


class Qwen3Vision(torch.nn.Module):
    """Qwen3-VL's vision tower for one image: ``(image_features, deepstack_features)``.

    ``interp_indices``/``interp_weights`` resample the learned position-embedding grid to the image's grid (the
    host computes them as transformers does). ``deepstack_features`` is ``(tokens, deepstack layers, hidden)``:
    the features the decoder adds to its first layers' image-token hidden states.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.visual = model.model.visual
        self.deepstack = [int(i) for i in self.visual.deepstack_visual_indexes]

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, interp_indices: torch.Tensor,
                interp_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        hidden = hidden + (visual.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1).to(hidden.dtype)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        stacked: list[torch.Tensor] = []
        for index, block in enumerate(visual.blocks):
            hidden = hidden + vision_attention(block.attn, block.norm1(hidden), cos, sin, None)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in self.deepstack:
                stacked.append(visual.deepstack_merger_list[self.deepstack.index(index)](hidden))
        return visual.merger(hidden), torch.stack(stacked, dim=1)


def dense_deepstack(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
                    visual_embeds: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` with ``visual_embeds`` (one row per True of ``visual_pos_masks``, in order) added at the
    masked positions: transformers' ``_deepstack_process`` as a gather, exact (the other positions add 0.0)."""
    batch, length, width = hidden_states.shape
    mask = visual_pos_masks.reshape(-1)
    rows = torch.where(mask, torch.cumsum(mask.to(torch.int64), dim=0), 0)  # 1-based row, 0 for a text token
    table = torch.cat([visual_embeds.new_zeros(1, width), visual_embeds.to(hidden_states.dtype)], dim=0)
    return hidden_states + table[rows].reshape(batch, length, width)


class DeepstackLanguageModel(torch.nn.Module):
    """Qwen3-VL's text model with its deepstack inputs as tensors: ``visual_pos_masks`` (batch, seq) and
    ``deepstack_features`` (image tokens, layers, hidden), empty in decode steps."""

    def __init__(self, language_model: Any) -> None:
        super().__init__()
        self.language_model = language_model
        # transformers adds the features with boolean indexing (``hidden[mask] += features``), a NonZero node that
        # TensorRT does not take; the same sums without it (only the exporter's own copy of the model is changed).
        language_model._deepstack_process = dense_deepstack

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                use_cache: bool, cache: Any, visual_pos_masks: torch.Tensor,
                deepstack_features: torch.Tensor) -> Any:
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, cache=cache, visual_pos_masks=visual_pos_masks.bool(),
            deepstack_visual_embeds=list(deepstack_features.unbind(1)),
        )
