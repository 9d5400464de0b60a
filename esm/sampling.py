"""Seeded samples of row indices: the one sampler behind every cap, split and shot count.

Each sample comes from one ``numpy.random.default_rng(seed)``, draws class by class
(classes in sorted order, each with ``rng.choice(members, size=quota, replace=False)``)
and returns the chosen indices in their original order. What differs between callers
is only the per-class quota:

- :func:`stratified_quotas`: class proportions kept, every class keeps at least one
  example where the size allows, largest remainders first (a capped task, a held-out
  test fraction of a built-in task);
- :func:`balanced_quotas`: every class an equal share, a class smaller than its share
  kept whole (class-balanced built-in tasks);
- a fixed number of shots per class (:func:`per_class_indices`);
- a held-out share of every class, each class of two or more rows keeping rows on
  both sides (:func:`holdout_indices`: test splits of local data, the LR search's
  validation split).

Regression labels (or none) are sampled uniformly (:func:`uniform_indices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from stepstone.esm.errors import ConfigError

Ties = Literal["quicksort", "stable"]

__all__ = [
    "balanced_quotas",
    "draw_per_class",
    "holdout_indices",
    "per_class_indices",
    "sample_indices",
    "stratified_quotas",
    "uniform_indices",
]


def stratified_quotas(counts: np.ndarray, limit: int, *, ties: Ties = "quicksort"
                      ) -> np.ndarray:
    """Per-class sizes of a stratified sample of ``limit`` rows.

    counts: int array of shape (n_classes,), the class sizes (their sum exceeds
    ``limit``). Each class gets ``floor(count * limit / total)``, at least one; an
    overshoot is taken back from the largest quotas, the rest goes round the classes
    in order of their rounding remainder (Hamilton's largest-remainder method).
    ``ties`` orders equal remainders as ``numpy.argsort(kind=ties)`` does: ``"stable"``
    by class order; ``"quicksort"`` (numpy's default, the same for up to 16 classes)
    is what :meth:`Task.subsample <stepstone.esm.data.Task.subsample>` has always
    used, ``"stable"`` what the built-in catalog has: each keeps its recorded data.
    """
    counts = np.asarray(counts)
    total = counts.sum()
    quota = np.maximum(1, np.floor(counts * limit / total).astype(int))
    while quota.sum() > limit:
        quota[np.argmax(quota)] -= 1
    order = np.argsort(-(counts * limit / total - quota), kind=ties)
    i = 0
    while quota.sum() < limit:
        c = order[i % len(order)]
        if quota[c] < counts[c]:
            quota[c] += 1
        i += 1
    return quota


def balanced_quotas(counts: np.ndarray, limit: int) -> np.ndarray:
    """Per-class sizes of a class-balanced sample of ``limit`` rows.

    counts: int array of shape (n_classes,). Every class gets an equal share; a class
    smaller than its share is kept whole and what it leaves is shared among the others
    (the first classes take the remainder of an uneven split).
    """
    counts = np.asarray(counts)
    quota = np.zeros(len(counts), dtype=int)
    left, open_ = limit, list(range(len(counts)))
    while open_ and left > 0:
        share = left // len(open_)
        small = [k for k in open_ if counts[k] - quota[k] <= share]
        if not small:
            for j, k in enumerate(open_):
                quota[k] += share + (1 if j < left - share * len(open_) else 0)
            break
        for k in small:
            left -= counts[k] - quota[k]
            quota[k] = counts[k]
        open_ = [k for k in open_ if k not in small]
    return quota


def draw_per_class(labels: np.ndarray, classes: np.ndarray, quotas: Sequence[int],
                   rng: np.random.Generator) -> np.ndarray:
    """Sorted indices: ``quotas[k]`` rows of ``classes[k]`` drawn without replacement.

    labels: array of shape (n,); classes and quotas: shape (n_classes,), classes in the
    order they are drawn (sorted, for every sampler here).
    """
    chosen = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
              for c, q in zip(classes, quotas, strict=True)]
    if not chosen:
        return np.zeros(0, dtype=np.intp)
    return np.sort(np.concatenate(chosen))


def uniform_indices(n: int, limit: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(limit, n)`` of ``n`` rows drawn uniformly with ``seed``."""
    if limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def sample_indices(
    labels: Sequence | np.ndarray,
    limit: int,
    *,
    seed: int = 0,
    label_kind: Literal["classification", "regression"] = "classification",
    balance: bool = False,
    ties: Ties = "quicksort",
) -> np.ndarray:
    """Sorted indices of a seeded sample of at most ``limit`` rows.

    labels: array of shape (n,). Classification labels are sampled per class,
    :func:`stratified_quotas` (or :func:`balanced_quotas` with ``balance``); regression
    labels uniformly. All rows when ``n <= limit``. ``ties``: see
    :func:`stratified_quotas`.
    """
    if limit < 1:
        raise ConfigError(f"A sample size must be a positive integer; got {limit}.")
    labels = np.asarray(labels)
    if len(labels) <= limit:
        return np.arange(len(labels))
    if label_kind == "regression":
        return uniform_indices(len(labels), limit, seed=seed)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = (balanced_quotas(counts, limit) if balance
              else stratified_quotas(counts, limit, ties=ties))
    return draw_per_class(labels, classes, quotas, rng)


def per_class_indices(labels: Sequence | np.ndarray, shots: int, *, seed: int = 0
                      ) -> np.ndarray:
    """Sorted indices of ``shots`` rows per class (all of a smaller class), seeded."""
    if shots < 1:
        raise ConfigError(f"'shots' must be >= 1; got {shots}.")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    return draw_per_class(labels, classes, np.minimum(counts, shots),
                          np.random.default_rng(seed))


def holdout_indices(labels: Sequence | np.ndarray, fraction: float, *, seed: int = 0,
                    label_kind: Literal["classification", "regression"] = "classification"
                    ) -> np.ndarray:
    """Sorted indices of the held-out part of a seeded two-way split.

    labels: array of shape (n,), n >= 2; fraction in (0, 1). Classification: each class
    of ``m >= 2`` rows holds out ``round(m * fraction)`` of them, at least one and at
    most ``m - 1`` (so it has rows on both sides); a single-row class stays on the kept
    side. Regression: ``round(n * fraction)`` rows (at least one) drawn uniformly.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"A held-out fraction must lie strictly between 0 and 1; got "
                          f"{fraction}.")
    labels = np.asarray(labels)
    if label_kind == "regression":
        return uniform_indices(len(labels), max(1, int(round(len(labels) * fraction))),
                               seed=seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = [min(max(int(round(m * fraction)), 1), m - 1) if m >= 2 else 0 for m in counts]
    return draw_per_class(labels, classes, quotas, np.random.default_rng(seed))
