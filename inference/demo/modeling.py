"""The demonstration model's architecture, tokenizer and processor, built offline from code.

Architecture: a scaled-down LLaVA (:class:`transformers.LlavaForConditionalGeneration`): a CLIP vision tower
(128 x 128 input, 16 x 16 patches, so 64 image tokens), LLaVA's two-layer projector, and a small Llama decoder.
The tokenizer is word-level (:mod:`tokenizers`): one token per word of the bilingual vocabulary, per Chinese
character, per piece of ``<ref>``/``<box>`` markup and per coordinate of the 0..999 grid (step 8). Everything
is saved with ``save_pretrained`` and loads with ``AutoProcessor`` / ``AutoModelForImageTextToText`` and
``local_files_only=True``.

Two initialisations make localisation learnable in minutes on a CPU: the vision tower's position embeddings
and the coordinate tokens' embeddings start as sinusoids of their 2-D position / value (both stay trainable).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from inference.demo.texts import CHAT_TEMPLATE, COORD_VALUES, IM_END, IM_START, IMAGE_TOKEN, all_texts

__all__ = [
    "IMAGE_SIZE",
    "NUM_IMAGE_TOKENS",
    "PATCH_SIZE",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "coordinate_token_ids",
]

IMAGE_SIZE = 128
PATCH_SIZE = 16
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
PAD, UNK = "<pad>", "<unk>"
SPECIALS = (PAD, UNK, IMAGE_TOKEN, IM_START, IM_END)

#: How text splits into vocabulary pieces: chat markers, ref/box tags, box brackets, numbers, words with their
#: leading space, and single characters (every Chinese character is its own piece).
PIECES = (
    r"<\|im_start\|>|<\|im_end\|>|</?ref>|</?box>|\[\[|\]\]|\], \[|\d+| ?[A-Za-z]+|, |: |\n|."
)


def _vocabulary() -> list[str]:
    pieces: set[str] = set()
    pattern = re.compile(PIECES, re.DOTALL)
    for text in all_texts():
        pieces.update(m.group(0) for m in pattern.finditer(text))
    pieces.update(str(v) for v in COORD_VALUES)
    pieces.update(str(d) for d in range(10))
    pieces.difference_update(SPECIALS)
    return [*SPECIALS, *sorted(pieces)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level bilingual tokenizer; decoding joins pieces back to the exact text."""
    vocab = {piece: i for i, piece in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        bos_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, IM_START]})
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    tokenizer = tokenizer or build_tokenizer()
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers: the PIL implementation under its classic name
        from transformers import CLIPImageProcessor as ImageProcessor  # type: ignore[assignment]
    image_processor = ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_resize=True,
        resample=2,  # bilinear, as the adapter resizes
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def coordinate_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of the coordinate values, in increasing value."""
    return [int(tokenizer.convert_tokens_to_ids(str(v))) for v in COORD_VALUES]


def build_config(tokenizer: Any) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, projection_dim=128,
    )
    text = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlavaConfig(  # type: ignore[call-arg]
        vision_config=vision, text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def _sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) 2-D sine/cosine position codes: half the channels for rows, half for columns."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(quarter, dtype=torch.float32) / quarter) * math.pi
    pos = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    enc = torch.cat([torch.sin(pos[:, None] * freqs * side / 2), torch.cos(pos[:, None] * freqs * side / 2)], 1)
    rows = enc[:, None, :].expand(side, side, 2 * quarter)
    cols = enc[None, :, :].expand(side, side, 2 * quarter)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, 4 * quarter)


def build_model(tokenizer: Any, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised demonstration model (deterministic for a seed)."""
    torch.manual_seed(seed)
    config = build_config(tokenizer)
    model: Any = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        vision = model.model.vision_tower.embeddings
        side = IMAGE_SIZE // PATCH_SIZE
        hidden = int(config.vision_config.hidden_size)  # type: ignore[union-attr]
        table = vision.position_embedding.weight            # (1 + side*side, hidden): CLS first
        table[1:] = _sincos_2d(side, hidden) * 0.5
        table[0] = 0.0
        embed = model.get_input_embeddings().weight
        ids = torch.tensor(coordinate_token_ids(tokenizer))
        values = torch.tensor(COORD_VALUES, dtype=torch.float32) / 999.0
        dim = embed.shape[1]
        freqs = torch.exp(-math.log(64.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2)) * math.pi
        codes = torch.cat([torch.sin(values[:, None] * freqs * 8), torch.cos(values[:, None] * freqs * 8)], 1)
        embed[ids] = codes * embed.std() * 1.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    return model
