"""A task model: an encoder with a linear head, and its folder format.

The artefact a registry build keeps with ``--keep-models`` and a transfer run saves
for its source models: ``encoder/`` (a transformers folder and its tokenizer),
``head.safetensors`` and ``head.json``. It lives in the bottom layer so that every
layer can load a kept source model (the ``source-logme`` and ``kernel`` scorers in
:mod:`stepstone.selection.scorers`, fine-tuning in :mod:`stepstone.finetune`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stepstone.esm.encoder import Encoder

TASK_MODEL_ENCODER = "encoder"
TASK_MODEL_HEAD = "head.safetensors"
TASK_MODEL_META = "head.json"

__all__ = ["TASK_MODEL_ENCODER", "TASK_MODEL_HEAD", "TASK_MODEL_META", "TaskModel",
           "load_task_model", "metrics_from_outputs", "save_task_model"]


class TaskModel(nn.Module):
    """An :class:`~stepstone.esm.encoder.Encoder` with a linear head on its pooled output.

    ``num_labels`` outputs: class logits, or one value for regression.
    """

    def __init__(self, encoder: Encoder, num_labels: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.backbone = encoder.model  # registered so .parameters() covers the encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.dim, num_labels, device=encoder.device)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.dropout(self.encoder.forward_batch(batch)))


def save_task_model(model: TaskModel, folder: str | Path, *, label_kind: str,
                    classes: list[str] | tuple[str, ...]) -> None:
    """Save a fine-tuned model as ``encoder/`` (transformers folder + tokenizer),
    ``head.safetensors`` and ``head.json`` (the format registries keep)."""
    from safetensors.torch import save_file
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # a per-save shard bar is noise inside a long run
    try:
        model.encoder.model.save_pretrained(folder / TASK_MODEL_ENCODER)
    finally:
        hf_logging.enable_progress_bar()
    model.encoder.tokenizer.save_pretrained(folder / TASK_MODEL_ENCODER)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
              str(folder / TASK_MODEL_HEAD))
    (folder / TASK_MODEL_META).write_text(json.dumps(
        {"num_labels": model.head.out_features, "label_kind": label_kind,
         "classes": list(classes), "pooling": model.encoder.pooling,
         "max_length": model.encoder.max_length}, indent=2, sort_keys=True))


def load_task_model(folder: str | Path, *, name: str | None = None,
                    device: str | torch.device = "cpu") -> TaskModel:
    """Load a model saved by :func:`save_task_model` (or kept by a registry build).

    ``name``: the encoder name to record (default: the folder).
    """
    from safetensors.torch import load_file

    from stepstone.esm.encoder import load_encoder

    folder = Path(folder)
    if not (folder / TASK_MODEL_META).is_file() or not (folder / TASK_MODEL_HEAD).is_file():
        raise FileNotFoundError(f"{folder} is not a saved task model: it needs "
                                f"{TASK_MODEL_ENCODER}/, {TASK_MODEL_HEAD} and {TASK_MODEL_META}.")
    meta = json.loads((folder / TASK_MODEL_META).read_text())
    encoder = load_encoder(str(folder / TASK_MODEL_ENCODER), pooling=meta["pooling"],
                           max_length=meta["max_length"], device=str(device))
    if name is not None:
        encoder.name = name
    model = TaskModel(encoder, int(meta["num_labels"]))
    model.head.load_state_dict(load_file(str(folder / TASK_MODEL_HEAD)))
    return model.to(device).eval()


def metrics_from_outputs(outputs: np.ndarray, labels: np.ndarray, label_kind: str
                         ) -> dict[str, float]:
    """Accuracy and macro-F1 from logits/predicted classes (classification), or MSE and
    Pearson r from predicted values (regression): the one scoring of a task model's (or
    a kernel's) predictions.

    outputs: (n, C) scores or (n,) predicted classes for classification; (n,) values.
    """
    from sklearn.metrics import accuracy_score, f1_score

    if label_kind == "classification":
        pred = outputs.argmax(1) if outputs.ndim == 2 else outputs
        return {"accuracy": float(accuracy_score(labels, pred)),
                "macro_f1": float(f1_score(labels, pred, average="macro"))}
    err = float(np.mean((outputs - labels) ** 2))
    r = float(np.corrcoef(outputs, labels)[0, 1]) if len(labels) > 1 else float("nan")
    return {"mse": err, "pearson": r}
