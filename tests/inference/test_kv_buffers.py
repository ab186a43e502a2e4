"""The decoder graph's attention over preallocated KV buffers equals transformers' attention over a grown cache.

Real transformers language models (random weights, grouped-query attention, a sliding window shorter than the
prompt, a left-padded row): the prompt is run as a prefill, then the rest one token at a time with each step's new
keys and values written into the buffers, as the graph backends do. Every step's logits must equal those of the
model's own forward over the whole sequence. Run in torch (the maths of the graph, without ONNX) so a difference
points at the attention, not at the export.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from inference.export.manifest import DecoderLayout
from inference.export.modules import TextDecoder, layout_of

PROMPT, TOTAL = 7, 13


def _gemma3(window: int) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=window, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
    )
    return Gemma3ForCausalLM(config)


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
    return Qwen2ForCausalLM(config)


MODELS = {"gemma3 window 3": lambda: _gemma3(3), "gemma3 window 64": lambda: _gemma3(64), "qwen2 gqa": _qwen2}


def _model(name: str) -> Any:
    torch.manual_seed(0)
    model = MODELS[name]()
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # larger weights, so that a wrong mask changes the logits clearly
        for parameter in model.parameters():
            parameter.mul_(8)
    return model.eval()


def _write(buffers: list[torch.Tensor], new: tuple[torch.Tensor, ...], start: int) -> None:
    for buffer, value in zip(buffers, new, strict=True):
        buffer[:, :, start : start + value.shape[2]] = value


@pytest.mark.parametrize("name", sorted(MODELS))
def test_buffer_decoding_gives_the_logits_of_the_whole_sequence(name: str) -> None:
    model = _model(name)
    layout: DecoderLayout = layout_of(model.config)
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, TOTAL))
    mask = torch.ones(2, TOTAL, dtype=torch.int64)
    mask[0, :3] = 0  # row 0 is left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        decoder = TextDecoder(model.model, model.lm_head, layout.layers, model.config)
        embeds = model.model.embed_tokens(ids)
        shape = (2, layout.kv_heads, TOTAL, layout.head_dim)
        buffers = [torch.full(shape, 1e4) for _ in range(2 * layout.layers)]  # unwritten slots hold junk
        empty = [torch.zeros(2, layout.kv_heads, 0, layout.head_dim) for _ in range(2 * layout.layers)]
        out = decoder(embeds[:, :PROMPT], mask[:, :PROMPT], positions[:, :PROMPT], torch.arange(PROMPT),
                      torch.zeros(2, 0, dtype=torch.int64), *empty)
        got = [out[0]]
        _write(buffers, out[1:], 0)
        for slot in range(PROMPT, TOTAL - 1):
            filled = mask.clone()
            filled[:, slot:] = 0  # what the backend has written so far
            out = decoder(embeds[:, slot : slot + 1], mask[:, slot : slot + 1], positions[:, slot : slot + 1],
                          torch.tensor([slot]), filled, *buffers)
            got.append(out[0])
            _write(buffers, out[1:], slot)
    want = expected[:, PROMPT - 1 : TOTAL - 1]
    difference = (torch.stack(got, dim=1) - want).abs().max().item()
    assert difference < 1e-3 * max(1.0, want.abs().max().item()), difference


def test_a_window_shorter_than_the_prompt_changes_the_answer() -> None:
    """The sliding-window case above is not vacuous: without its window the same model gives other logits."""
    windowed, whole = _model("gemma3 window 3"), _model("gemma3 window 64")
    ids = torch.randint(3, 97, (1, TOTAL))
    with torch.no_grad():
        difference = (windowed(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
    assert difference > 1.0
