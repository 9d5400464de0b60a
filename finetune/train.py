"""Fine-tuning an encoder with a fresh task head, and evaluating it.

The loop is deliberately plain PyTorch: AdamW, linear decay, gradient clipping,
length-grouped batches with dynamic padding, a progress bar, and an early stop
with a clear message when the loss turns NaN.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from esm.data import Split, Task
from esm.encoder import Encoder

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training diverged (NaN/inf loss) or cannot start."""


@dataclass
class FinetuneSettings:
    """Fine-tuning hyper-parameters (defaults: the ESM paper's source fine-tuning)."""

    lr: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    epochs: int = field(default=3, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=32, metadata={"help": "Examples per step."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps to warm up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the head."})
    seed: int = field(default=0, metadata={"help": "Seed for the head init and batch order."})

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"Need lr > 0, epochs >= 1, batch_size >= 1; got lr={self.lr}, "
                             f"epochs={self.epochs}, batch_size={self.batch_size}.")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"'warmup_ratio' and 'dropout' must be in [0, 1); got "
                             f"{self.warmup_ratio}, {self.dropout}.")

    def to_dict(self) -> dict:
        return asdict(self)


class TaskModel(nn.Module):
    """An :class:`~esm.encoder.Encoder` with a linear head on its pooled output.

    ``num_labels`` outputs: class logits, or one value for regression.
    """

    def __init__(self, encoder: Encoder, num_labels: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.backbone = encoder.model  # registered so .parameters() covers the encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.dim, num_labels)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.dropout(self.encoder.forward_batch(batch)))


def _batches(encoded, order: np.ndarray, batch_size: int, tokenizer):
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        feats = [{k: encoded[k][i] for k in keys} for i in idx]
        yield idx, dict(tokenizer.pad(feats, padding="longest", return_tensors="pt"))


def _length_grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator
                          ) -> np.ndarray:
    """Shuffled order whose consecutive batches have similar lengths (less padding)."""
    perm = rng.permutation(len(lengths))
    mega = batch_size * 50
    chunks = [perm[i:i + mega] for i in range(0, len(perm), mega)]
    chunks = [c[np.argsort(-lengths[c], kind="stable")] for c in chunks]
    batches = [b for c in chunks for b in np.array_split(c, max(1, math.ceil(len(c) / batch_size)))]
    rng.shuffle(batches)
    return np.concatenate(batches) if batches else perm


NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not n.endswith(NO_DECAY)],
             "weight_decay": weight_decay},
            {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0}]


@dataclass
class TrainResult:
    """What a fine-tuning run did."""

    steps: int
    seconds: float
    losses: list[float]


def finetune(
    model: TaskModel,
    split: Split,
    *,
    label_kind: str,
    settings: FinetuneSettings | None = None,
    progress: bool = True,
    desc: str = "fine-tuning",
    lr_distribution: str | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (encoder and head) on ``split`` in place.

    ``lr_distribution``: a layer-wise learning-rate spec (``flat:LR``,
    ``llrd:LR,DECAY``, ``kenneweg``, a JSON file; see :mod:`finetune.lr`); by
    default every parameter uses ``settings.lr``.
    """
    settings = settings or FinetuneSettings()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    enc = model.encoder
    encoded = enc.tokenize(split.inputs())
    lengths = np.array([len(x) for x in encoded["input_ids"]])
    if label_kind == "classification":
        labels = torch.as_tensor(split.labels, dtype=torch.long)
        loss_fn: nn.Module = nn.CrossEntropyLoss()
    else:
        labels = torch.as_tensor(split.labels, dtype=torch.float32)
        loss_fn = nn.MSELoss()
    steps_per_epoch = math.ceil(len(split) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = int(total * settings.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    if lr_distribution is None:
        groups = _decay_groups(model, settings.weight_decay)
    else:
        from finetune.lr import layer_groups, param_groups, resolve_distribution

        layers = layer_groups(model)
        groups = param_groups(model, resolve_distribution(lr_distribution, layers), layers,
                              weight_decay=settings.weight_decay)
    opt = torch.optim.AdamW(groups, lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
        else max(0.0, (total - s) / max(1, total - warmup)))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    step = 0
    for _ in range(settings.epochs):
        order = _length_grouped_order(lengths, settings.batch_size, rng)
        for idx, batch in _batches(encoded, order, settings.batch_size, enc.tokenizer):
            out = model(batch)
            y = labels[torch.as_tensor(idx)]
            loss = loss_fn(out.squeeze(-1), y) if label_kind == "regression" else loss_fn(out, y)
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingError(
                    f"Loss became {loss.item()} at step {step + 1} of {total} ({desc}); stopped. "
                    f"Try a lower learning rate than {settings.lr}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
    model.eval()
    enc.invalidate_fingerprint()
    return TrainResult(step, time.perf_counter() - start, losses)


@torch.inference_mode()
def predict(model: TaskModel, split: Split, *, batch_size: int = 64) -> np.ndarray:
    """Model outputs for a split: (n, num_labels) logits or (n,) regression values."""
    model.eval()
    enc = model.encoder
    encoded = enc.tokenize(split.inputs())
    order = np.argsort([-len(x) for x in encoded["input_ids"]], kind="stable")
    out = np.empty((len(split), model.head.out_features), dtype=np.float32)
    for idx, batch in _batches(encoded, order, batch_size, enc.tokenizer):
        out[idx] = model(batch).float().numpy()
    return out[:, 0] if model.head.out_features == 1 else out


def evaluate(model: TaskModel, task: Task, split: Split | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 (classification) or MSE and Pearson r (regression)."""
    from sklearn.metrics import accuracy_score, f1_score

    split = split or task.test
    out = predict(model, split)
    if task.label_kind == "classification":
        pred = out.argmax(1)
        return {"accuracy": float(accuracy_score(split.labels, pred)),
                "macro_f1": float(f1_score(split.labels, pred, average="macro"))}
    err = float(np.mean((out - split.labels) ** 2))
    r = float(np.corrcoef(out, split.labels)[0, 1]) if len(split) > 1 else float("nan")
    return {"mse": err, "pearson": r}
