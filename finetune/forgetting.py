"""Forgetting and drift measures for the transfer pipeline.

- source retention: the source task's metric with its own head before and after
  target fine-tuning (difference and ratio);
- backward transfer (BWT) over a chain of tasks (Lopez-Paz & Ranzato 2017);
- per-layer weight drift from the pre-trained weights (relative Frobenius norm);
- linear CKA between layer outputs (Kornblith et al. 2019) on a fixed sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from stepstone.finetune.lr import layer_groups


@dataclass(frozen=True)
class Retention:
    """Source metric before/after target fine-tuning: ``delta = after - before``,
    ``ratio = after / before``."""

    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else float("nan")


def backward_transfer(acc: np.ndarray) -> float:
    """BWT = mean over tasks i < T of ``acc[T-1, i] - acc[i, i]``.

    acc: array of shape (T, T); ``acc[j, i]`` is task i's metric after training on
    tasks 0..j in order.
    """
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] < 2:
        raise ValueError(f"'acc' must be a square (T, T) matrix with T >= 2; got {acc.shape}.")
    T = acc.shape[0]
    return float(np.mean([acc[T - 1, i] - acc[i, i] for i in range(T - 1)]))


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of two representations of the same n examples (Kornblith et al. 2019).

    X: (n, d1), Y: (n, d2). 1 for identical representations up to rotation and
    isotropic scaling; invariant to both.
    """
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(X) < 2:
        raise ValueError(f"Need (n, d1) and (n, d2) with the same n >= 2; got {X.shape}, "
                         f"{Y.shape}.")
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    cross = np.linalg.norm(Y.T @ X) ** 2
    norm = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    return float(cross / norm) if norm > 0 else float("nan")


@torch.no_grad()
def weight_drift(reference: nn.Module, tuned: nn.Module) -> dict[str, float]:
    """Relative drift ``||θ - θ0|| / ||θ0||`` per layer group (embeddings, layer.i, head).

    Only parameters present in both models with equal shapes count (a fresh head
    has no pre-trained counterpart and is skipped).
    """
    ref = dict(reference.named_parameters())
    out = {}
    groups = layer_groups(tuned)
    for g, names in zip(groups.names, groups.params, strict=True):
        diff = base = 0.0
        for name in names:
            p0 = _match(ref, name)
            if p0 is None:
                continue
            p = dict(tuned.named_parameters())[name]
            if p0.shape != p.shape:
                continue
            diff += float((p - p0).double().pow(2).sum())
            base += float(p0.double().pow(2).sum())
        if base > 0:
            out[g] = (diff / base) ** 0.5
    return out


def _match(ref: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """Find ``name`` in ``ref`` allowing a wrapper prefix on either side."""
    if name in ref:
        return ref[name]
    for key, value in ref.items():
        if name.endswith("." + key) or key.endswith("." + name):
            return value
    return None


def linear_probe(encoder, train, test, *, label_kind: str) -> float:
    """Refit a linear head on a frozen encoder's pooled embeddings.

    train, test: :class:`~stepstone.esm.data.Split`. Logistic regression on standardised
    embeddings (classification: test accuracy) or ridge regression (regression: test
    Pearson r). Comparing it before and after target fine-tuning separates a
    mismatched old head from a representation that lost the task.
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X_train = encoder.embed(train.inputs(), progress=False)
    X_test = encoder.embed(test.inputs(), progress=False)
    if label_kind == "classification":
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(X_train, train.labels)
        return float(probe.score(X_test, test.labels))
    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    probe.fit(X_train, train.labels)
    pred = probe.predict(X_test)
    return float(np.corrcoef(pred, test.labels)[0, 1])


def layer_representations(encoder, texts, *, batch_size: int = 64) -> list[np.ndarray]:
    """Mean-pooled hidden states after the embeddings and after each layer (the masked
    mean whatever the encoder's own pooling; :meth:`~stepstone.esm.encoder.Encoder.pooled_layers`).

    Returns ``num_layers + 1`` float64 arrays of shape (n, dim).
    """
    batches = [[p.double().cpu().numpy() for p in pooled]
               for pooled in encoder.pooled_layers(list(texts), batch_size=batch_size,
                                                   pooling="mean")]
    if not batches:
        raise ValueError("layer_representations needs at least one text.")
    return [np.concatenate(depth) for depth in zip(*batches, strict=True)]


def layer_cka(reference, tuned, texts) -> dict[str, float]:
    """Linear CKA between two encoders' outputs, per depth, on the same texts.

    Keys: ``embeddings`` and ``layer.i`` (output of transformer layer i).
    """
    a = layer_representations(reference, texts)
    b = layer_representations(tuned, texts)
    if len(a) != len(b):
        raise ValueError(f"Encoders have different depths: {len(a) - 1} vs {len(b) - 1} layers.")
    names = ["embeddings"] + [f"layer.{i}" for i in range(len(a) - 1)]
    return {n: linear_cka(x, y) for n, x, y in zip(names, a, b, strict=True)}
