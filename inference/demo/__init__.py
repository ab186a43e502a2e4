"""The built-in demonstration model: synthetic phantoms, training, evaluation and the packaged checkpoint.

A small LLaVA-architecture model trained by the project on synthetic radiograph-like and CT-slice-like phantoms
(``python -m inference.demo.train``), evaluated on held-out phantoms (``python -m inference.demo.evaluate``).
It exists so that the node shows real grounded findings on any machine, offline. It is a demonstration model,
NOT for clinical use: its name, its answers and its SR say so.

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path

from sr_writer.findings import Language

__all__ = ["CHECKPOINT_DIR", "DISCLAIMER", "MODEL_NAME"]

#: The packaged checkpoint (``model.family: demo`` with ``model.path`` unset).
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"

#: The algorithm name recorded in the SR (at most 64 characters, a DICOM LO).
MODEL_NAME = "Demo model, synthetic phantoms, not for clinical use"

#: Appended to every narrative the demonstration model produces.
DISCLAIMER: dict[Language, str] = {
    Language.ENGLISH: "[Demonstration model trained on synthetic phantoms; not for clinical use.]",
    Language.CHINESE: "【演示模型，基于合成体模训练，不可用于临床。】",
}
