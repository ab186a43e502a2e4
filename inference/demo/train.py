"""Train the demonstration model on synthetic phantoms, on a CPU: ``python -m inference.demo.train``.

Seeded end to end (phantoms, initialisation, batch order, prompts): the same command on the same software gives
the same weights. The default schedule takes about a quarter of an hour on two CPU cores and writes the checkpoint
(model, tokenizer, processor, generation config, a model card) to ``inference/demo/checkpoint/``.

The loss is cross-entropy on the answer tokens; for coordinate tokens the target is spread over the neighbouring
grid values (a narrow Gaussian), so that an answer one grid step off costs little. A training-only auxiliary head
(not part of the saved model) reads the image tokens as the decoder receives them and is asked, per token, whether
a lesion covers it, which kind, and the lesion's box (dense supervision in the style of one-stage detectors): it
teaches the vision tower and projector to put each lesion's extent into the tokens the decoder copies from, which
makes localisation learnable in minutes instead of hours.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from inference.demo import CHECKPOINT_DIR, DISCLAIMER, MODEL_NAME
from inference.demo.data import Example, make_example, texts_for
from inference.demo.modeling import (
    NUM_IMAGE_TOKENS,
    build_model,
    build_processor,
    build_tokenizer,
    coordinate_token_ids,
)
from inference.demo.phantoms import iter_phantoms
from inference.demo.texts import IM_END, IMAGE_TOKEN
from sr_writer.findings import Language

__all__ = ["TrainSettings", "main", "train"]

logger = logging.getLogger(__name__)

#: Seed of the training phantoms; the evaluation uses a different one (see inference.demo.evaluate).
TRAIN_SEED = 7


@dataclass(frozen=True)
class TrainSettings:
    seed: int = TRAIN_SEED
    n_train: int = 4000
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    coord_sigma: float = 0.75      # grid steps
    aux_weight: float = 1.0        # weight of the dense auxiliary loss on the image tokens
    threads: int = 2
    device: str = "cpu"


def _soft_targets(vocab_size: int, coord_ids: Sequence[int], sigma: float) -> torch.Tensor:
    """(vocab, vocab): row t is the target distribution when the answer token is t."""
    table = torch.eye(vocab_size)
    ids = torch.tensor(coord_ids)
    k = torch.arange(len(coord_ids), dtype=torch.float32)
    weights = torch.exp(-0.5 * ((k[:, None] - k[None, :]) / sigma) ** 2)
    weights = torch.where(weights < 1e-3, torch.zeros_like(weights), weights)
    weights = weights / weights.sum(dim=1, keepdim=True)
    table[ids] = 0.0
    table[ids[:, None], ids[None, :]] = weights
    return table


def _pixel_values(examples: Sequence[Example]) -> torch.Tensor:
    """What the CLIP image processor makes of the model-input images: rescale 1/255, normalise mean 0.5, std 0.5."""
    grey = torch.from_numpy(np.stack([e.grey for e in examples])).float() / 255.0
    grey = (grey - 0.5) / 0.5
    return grey[:, None].expand(-1, 3, -1, -1).contiguous()


def encode_pair(tokenizer: object, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids with the image token expanded, labels with the prompt masked) for one example."""
    tok = tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)  # type: ignore[attr-defined]
    prompt_ids: list[int] = []
    for i in tok(prompt, add_special_tokens=False)["input_ids"]:  # type: ignore[operator]
        prompt_ids += [i] * NUM_IMAGE_TOKENS if i == image_id else [i]
    answer_ids = tok(answer + IM_END, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _batch(
    tokenizer: object, examples: Sequence[Example], rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    pairs = [encode_pair(tokenizer, *texts_for(e, rng)) for e in examples]
    length = max(len(ids) for ids, _ in pairs)
    pad = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    input_ids = torch.full((len(pairs), length), pad, dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    attention = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "pixel_values": _pixel_values(examples)}


_KINDS = {"nodule": 0, "opacity": 1}


def _dense_targets(examples: Sequence[Example], grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image token (row-major grid): covered by a lesion (0/1), its kind, its box (relative x0, y0, x1, y1).

    A token is covered when its cell centre lies in a lesion's box (the smallest box when several); the cell
    holding a lesion's centre is always covered, however small the lesion.
    """
    count = len(examples)
    covered = torch.zeros(count, grid * grid)
    kind = torch.zeros(count, grid * grid, dtype=torch.long)
    boxes = torch.zeros(count, grid * grid, 4)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    for n, example in enumerate(examples):
        phantom = example.phantom
        ordered = sorted(phantom.lesions, key=lambda s: -s.box.area)  # small boxes written last win
        for lesion in ordered:
            b = lesion.box
            rel = torch.tensor([b.x0 / phantom.columns, b.y0 / phantom.rows, b.x1 / phantom.columns,
                                b.y1 / phantom.rows])
            inside_x = (centres >= rel[0]) & (centres <= rel[2])
            inside_y = (centres >= rel[1]) & (centres <= rel[3])
            cells = (inside_y[:, None] & inside_x[None, :]).reshape(-1)
            cx = min(int((rel[0] + rel[2]) / 2 * grid), grid - 1)
            cy = min(int((rel[1] + rel[3]) / 2 * grid), grid - 1)
            cells[cy * grid + cx] = True
            covered[n, cells] = 1.0
            kind[n, cells] = _KINDS[lesion.label]
            boxes[n, cells] = rel
    return covered, kind, boxes


def _dense_loss(head: torch.nn.Module, tokens: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    grid = round(math.sqrt(NUM_IMAGE_TOKENS))
    covered, kind, boxes = (t.to(tokens.device) for t in _dense_targets(examples, grid))
    out = head(tokens.reshape(len(examples), grid * grid, -1))
    weight = torch.tensor(4.0, device=tokens.device)
    objectness = F.binary_cross_entropy_with_logits(out[..., 0], covered, pos_weight=weight)
    positive = covered > 0
    if not positive.any():
        return objectness
    kind_loss = F.cross_entropy(out[..., 1:3][positive], kind[positive])
    box_loss = F.l1_loss(torch.sigmoid(out[..., 3:7][positive]), boxes[positive]) * 10.0
    return objectness + kind_loss + box_loss


def _lr(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.learning_rate * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(settings: TrainSettings, out: Path) -> Path:
    """Train and save the checkpoint to ``out``; returns ``out``."""
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    logger.info("generating %d training phantoms (seed %d)", settings.n_train, settings.seed)
    examples = [make_example(p) for p in iter_phantoms(settings.seed, settings.n_train)]
    generated = time.perf_counter() - started
    logger.info("phantoms ready in %.0f s", generated)

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model: Any = build_model(tokenizer, settings.seed)
    device = torch.device(settings.device)
    model.to(device).train()
    soft = _soft_targets(len(tokenizer), coordinate_token_ids(tokenizer), settings.coord_sigma).to(device)
    width = model.config.text_config.hidden_size
    aux_head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 7)).to(device)
    named = [*model.named_parameters(), *(("aux." + n, p) for n, p in aux_head.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate, betas=(0.9, 0.98),
    )
    rng = np.random.default_rng(settings.seed + 1)
    running = dense_running = 0.0
    for step in range(settings.steps):
        for group in optimiser.param_groups:
            group["lr"] = _lr(step, settings)
        chosen = [examples[i] for i in rng.choice(len(examples), size=settings.batch_size, replace=False)]
        batch = {k: v.to(device) for k, v in _batch(tokenizer, chosen, rng).items()}
        outputs = model.model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
        )
        hidden = outputs.last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = model.lm_head(hidden[:, :-1][keep])
        text_loss = -(soft[targets[keep]] * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        dense = _dense_loss(aux_head, outputs.image_hidden_states, chosen)
        loss = text_loss + settings.aux_weight * dense
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        running = 0.95 * running + 0.05 * float(text_loss) if step else float(text_loss)
        dense_running = 0.95 * dense_running + 0.05 * float(dense) if step else float(dense)
        if step % 50 == 0 or step == settings.steps - 1:
            logger.info("step %d/%d text loss %.4f dense loss %.4f lr %.2e (%.0f s)", step, settings.steps,
                        running, dense_running, _lr(step, settings), time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    model.to("cpu").eval()
    save(model, processor, out, settings, elapsed, float(running))
    logger.info("checkpoint written to %s after %.0f s", out, elapsed)
    return out


MODEL_CARD = """# {name}

{disclaimer_en}
{disclaimer_zh}

A demonstration model of the DICOM AI node. Architecture: LLaVA (`LlavaForConditionalGeneration`): a CLIP vision
tower (128 x 128 input, 16 x 16 patches, 4 layers, width 128), LLaVA's projector and a Llama decoder (3 layers,
width 128), with a word-level bilingual tokenizer. {parameters:,} parameters.

Trained by `python -m inference.demo.train` on {n_train} synthetic phantoms (radiograph-like and CT-slice-like
images with nodules and opacities, written as DICOM), {steps} steps of {batch_size}, in {minutes:.1f} minutes
on a CPU. It knows nodule/结节, opacity/阴影, right lung/右肺, left lung/左肺, heart/心脏, and answers in the
MedRegA grounded format `<ref>label</ref><box>[[x1, y1, x2, y2]]</box>` (0..999 relative to the image).

It has never seen a real patient image. It must not be used for any clinical purpose.
"""


def save(model: torch.nn.Module, processor: object, out: Path, settings: TrainSettings, seconds: float,
         loss: float) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    processor.save_pretrained(out)  # type: ignore[attr-defined]
    parameters = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(MODEL_CARD.format(
        name=MODEL_NAME, disclaimer_en=DISCLAIMER[Language.ENGLISH], disclaimer_zh=DISCLAIMER[Language.CHINESE],
        parameters=parameters, n_train=settings.n_train, steps=settings.steps, batch_size=settings.batch_size,
        minutes=seconds / 60,
    ), encoding="utf-8")
    (out / "training.json").write_text(json.dumps(
        {"settings": asdict(settings), "seconds": round(seconds), "final_loss": round(loss, 4),
         "parameters": parameters}, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the demonstration model on synthetic phantoms (CPU).")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint directory to (re)write")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--n-train", type=int, default=TrainSettings.n_train)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads)
    parser.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = TrainSettings(steps=args.steps, n_train=args.n_train, batch_size=args.batch_size,
                             threads=args.threads, device=args.device)
    train(settings, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
