"""Tiny random-weight checkpoints of each family, built offline in a temporary directory.

Each builder writes a directory that looks like the family's published checkpoint (config.json, safetensors
weights, tokenizer, image processor, chat template) but holds a model of a few hundred kilobytes, so the adapter
and the transformers backend run their real code path on CPU in about a second. The tokenizer is word-level
(``tokenizers`` library) over a small vocabulary: the special tokens of the family, the words of the box formats
and the integers 0..1000, so that generated ids decode to text the parsers read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else 'user' }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

WORDS = (
    ["<ref>", "</ref>", "<box>", "</box>", "[[", "]]", "[", "]", ",", ":", "：", "{", "}", '"bbox_2d":', '"label":']
    + ["right", "lung", "left", "heart", "nodule", "Findings:", "Impression:", "normal", "```json", "```"]
    + ['"right', 'lung"', '"box_2d":', "Final", "Answer:", "No", "effusion."]
    + [str(i) for i in range(1001)]
)


def build_tokenizer(
    directory: Path,
    specials: Sequence[str],
    eos: str,
    pad: str,
    bos: str | None = None,
    template: str = CHATML_TEMPLATE,
    extra: dict[str, Any] | None = None,
) -> Any:
    """A word-level fast tokenizer with the family's special tokens, saved in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in ["[UNK]", *specials, *WORDS]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    kwargs: dict[str, Any] = {
        "tokenizer_object": backend,
        "unk_token": "[UNK]",
        "eos_token": eos,
        "pad_token": pad,
        "additional_special_tokens": [t for t in specials if t not in {eos, pad, bos}],
        "chat_template": template,
    }
    if bos:
        kwargs["bos_token"] = bos
    kwargs.update(extra or {})
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return tokenizer


def _save(model: torch.nn.Module, processor: Any, directory: Path) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _qwen_tokenizer(directory: Path) -> tuple[Any, dict[str, int]]:
    """The Qwen-VL families' special tokens and ChatML template, shared by Qwen2.5-VL and Qwen3-VL."""
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    template = CHATML_TEMPLATE.replace("{{ IMAGE }}", "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer = build_tokenizer(directory, specials, eos="<|im_end|>", pad="<|endoftext|>", template=template)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    return tokenizer, ids


def _qwen2_5_vl(directory: Path, text: dict[str, Any], vision: dict[str, Any], *, bos: bool = False) -> Path:
    """A random Qwen2.5-VL with the test tokenizer; ``text`` and ``vision`` give the sizes, ``bos`` sets
    ``<|endoftext|>`` as its beginning-of-sequence token."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = _qwen_tokenizer(directory)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "num_hidden_layers": 2,
            "max_position_embeddings": 4096,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            **({"bos_token_id": ids["<|endoftext|>"]} if bos else {}),
            **text,
        },
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "window_size": 56, **vision},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    torch.manual_seed(0)
    return _save(Qwen2_5_VLForConditionalGeneration(config).eval(), image_processor, directory)


def build_qwen2_5_vl(directory: Path) -> Path:
    return _qwen2_5_vl(
        directory,
        text={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        },
        vision={"depth": 2, "out_hidden_size": 32, "fullatt_block_indexes": [1]},
        bos=True,
    )


def build_qwen2_5_vl_7b_rope(directory: Path) -> Path:
    """A small random Qwen2.5-VL whose attention heads are Qwen2.5-VL-7B's: head_dim 128, M-RoPE sections
    [16, 24, 24], rope_theta 1e6, and weights drawn wider than the 0.02 default (std 0.1, nearer trained weights).

    At these widths a wrong position changes the logits by several units and the greedy tokens, where the tiny
    model above (head_dim 8) moves them by under 1e-3; still 2 layers and a few MB, fast on CPU.
    """
    return _qwen2_5_vl(
        directory,
        text={
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "initializer_range": 0.1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        },
        vision={"depth": 1, "out_hidden_size": 256, "fullatt_block_indexes": [0]},
    )


def build_qwen3_vl(directory: Path) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = _qwen_tokenizer(directory)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 32,
            "patch_size": 16,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=256 * 256)
    torch.manual_seed(0)
    return _save(Qwen3VLForConditionalGeneration(config).eval(), image_processor, directory)


def build_internvl(directory: Path) -> Path:
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    template = CHATML_TEMPLATE.replace("{{ IMAGE }}", "<IMG_CONTEXT>\n")
    tokenizer = build_tokenizer(
        directory,
        specials,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=template,
        extra={
            "model_specific_special_tokens": {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",  # as the published -hf tokenizers; InternVLProcessor needs it
            }
        },
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": [56, 56],
            "patch_size": [14, 14],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=2
    )
    torch.manual_seed(0)
    return _save(InternVLForConditionalGeneration(config).eval(), image_processor, directory)


def build_gemma3(directory: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ]
    tokenizer = build_tokenizer(
        directory,
        specials,
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        template=GEMMA_TEMPLATE,
        extra={
            "model_specific_special_tokens": {
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            }
        },
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    config = Gemma3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 56,
            "patch_size": 14,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 4096,
            "sliding_window": 6,  # shorter than a prompt: the window masks of the KV buffers are exercised
            "query_pre_attn_scalar": 8,
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
        },
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    torch.manual_seed(0)
    return _save(Gemma3ForConditionalGeneration(config).eval(), image_processor, directory)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "internvl": build_internvl,
    "medgemma": build_gemma3,
}
