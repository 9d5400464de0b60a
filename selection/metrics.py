"""Selection metrics: how good a ranking of source tasks is, against measured transfer.

For one target T, ``perf`` maps each source S to the measured target performance after
fine-tuning on S first (the ground truth of a transfer matrix) and ``order`` is a
method's ranking of the sources, best first. Every metric scores that order as given
(ties already broken), and only sources present in ``perf`` count.

- :func:`regret_at_k`: the loss, in percent of the best, from taking the best of the
  top k instead of the best choice (Schulte et al. 2024, ESM-LogME, arXiv 2410.15148).
- :func:`ndcg_at_k`: normalised discounted cumulative gain (Järvelin & Kekäläinen 2002,
  "Cumulated gain-based evaluation of IR techniques", ACM TOIS 20(4); used for task
  selection by Vu et al. 2020 and Schulte et al. 2024).
- :func:`spearman_gain`: Spearman's rank correlation (Spearman 1904) between the order
  and the transfer gains over fine-tuning without an intermediate step.
- :func:`random_regret_at_k` and :func:`random_ndcg_at_k`: the exact expectation of
  those metrics over uniformly random orders (no sampling), the chance reference.
- :func:`bootstrap_ci` (percentile bootstrap of a mean over targets; Efron & Tibshirani
  1993) and :func:`paired_permutation_test` (sign-flip test of a mean paired
  difference over targets; Good 2005, "Permutation, Parametric and Bootstrap Tests").

:class:`GroundTruth` holds a transfer matrix's measured cells (per seed) and
:func:`load_ground_truth` builds it from the matrix's result rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from itertools import permutations
from typing import Any

import numpy as np

from stepstone.esm.data import DataError
from stepstone.esm.errors import ConfigError

__all__ = [
    "DEFAULT_KS",
    "GroundTruth",
    "bootstrap_ci",
    "load_ground_truth",
    "ndcg_at_k",
    "paired_permutation_test",
    "random_ndcg_at_k",
    "random_regret_at_k",
    "regret_at_k",
    "spearman_gain",
]

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 3, 5)


def _ranked(perf: dict[str, float], order: Sequence[str]) -> list[str]:
    return [s for s in order if s in perf]


def regret_at_k(perf: dict[str, float], order: Sequence[str], k: int, *,
                baseline: float | None = None) -> float:
    """Regret@k in percent: ``100 * (best - best_topk) / best``.

    perf: source -> measured target performance; order: sources, best first.
    ``best_topk`` is the largest ``perf`` among the k top-ranked sources; ``best`` is
    ``max(perf)``, or ``max(max(perf), baseline)`` when ``baseline`` (the performance
    without an intermediate step) is given, so a method whose every pick hurts is
    charged against plain fine-tuning. The top-k choice itself never falls back to
    "no intermediate step". Schulte et al. (2024, arXiv 2410.15148) normalise by the
    best source, which is ``baseline=None``.
    """
    ranked = _ranked(perf, order)
    if not ranked or k < 1:
        raise ConfigError(f"Need k >= 1 and at least one ranked source; got k={k}, "
                          f"{len(ranked)} ranked.")
    best = max(perf.values())
    if baseline is not None:
        best = max(best, baseline)
    picked = max(perf[s] for s in ranked[:k])
    return 100.0 * (best - picked) / best


def ndcg_at_k(perf: dict[str, float], order: Sequence[str], k: int = 5) -> float:
    """NDCG@k of ``order`` with relevance ``perf - min(perf)`` (Järvelin & Kekäläinen
    2002; computed with sklearn's ``ndcg_score``).

    The shift makes relevances non-negative; with fewer than two ranked sources, or
    all relevances equal, every order is ideal and the score is 1.0.
    """
    from sklearn.metrics import ndcg_score

    ranked = _ranked(perf, order)
    if len(ranked) < 2:
        return 1.0
    rel = np.array([perf[s] for s in ranked], dtype=np.float64)
    rel -= rel.min()
    if not rel.any():
        return 1.0  # every order of equally good sources is ideal
    score = -np.arange(len(ranked), dtype=np.float64)  # the order itself, no ties
    return float(ndcg_score(rel[None, :], score[None, :], k=k))


def spearman_gain(perf: dict[str, float], order: Sequence[str], baseline: float) -> float:
    """Spearman's rank correlation between ``order`` and the gains ``perf - baseline``.

    1.0 when the order sorts the sources by gain, -1.0 when it reverses them; nan when
    fewer than two sources are ranked or all gains are equal (no order to match).
    """
    from scipy.stats import spearmanr

    ranked = _ranked(perf, order)
    gains = np.array([perf[s] - baseline for s in ranked])
    if len(ranked) < 2 or np.ptp(gains) == 0:
        return float("nan")
    return float(spearmanr(-np.arange(len(ranked)), gains).statistic)


def random_regret_at_k(perf: dict[str, float], k: int, *,
                       baseline: float | None = None) -> float:
    """The exact mean of :func:`regret_at_k` over all orders of ``perf``'s sources.

    Regret is linear in the picked performance, and the best of k sources drawn without
    replacement is the i-th smallest of n with probability C(i-1, k-1) / C(n, k).
    """
    from math import comb

    vals = np.sort(np.array(list(perf.values()), dtype=np.float64))
    n = len(vals)
    if n == 0 or k < 1:
        raise ConfigError(f"Need k >= 1 and at least one source; got k={k}, {n} sources.")
    k = min(k, n)
    weights = np.array([comb(i, k - 1) for i in range(n)], dtype=np.float64) / comb(n, k)
    picked = float(weights @ vals)
    best = float(vals[-1]) if baseline is None else max(float(vals[-1]), baseline)
    return 100.0 * (best - picked) / best


def random_ndcg_at_k(perf: dict[str, float], k: int = 5) -> float:
    """The exact mean of :func:`ndcg_at_k` over all orders of ``perf``'s sources.

    Every position holds each source with probability 1/n, so the expected DCG is the
    mean relevance times the sum of the first k discounts; the ideal DCG is fixed.
    """
    rel = np.array(list(perf.values()), dtype=np.float64)
    if len(rel) < 2:
        return 1.0
    rel -= rel.min()
    if not rel.any():
        return 1.0
    kk = min(k, len(rel))
    discounts = 1.0 / np.log2(np.arange(2, kk + 2))
    ideal = float(np.sort(rel)[::-1][:kk] @ discounts)
    return float(rel.mean() * discounts.sum() / ideal)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the values,
    e.g. targets, with replacement); nan values are left out. (nan, nan) for fewer
    than two values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_permutation_test(a: Sequence[float], b: Sequence[float], *,
                            n_perm: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value that the mean of the paired differences ``a - b`` is zero.

    Under the null each pair's difference is as likely positive as negative, so the
    reference distribution flips the signs: all 2^n flips when n <= 16, else
    ``n_perm`` random flips (p with the +1 correction of Phipson & Smyth 2010). Pairs
    with a nan are left out; 1.0 when no difference is non-zero.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ConfigError(f"Paired values need equal lengths; got {a.shape} and {b.shape}.")
    d = (a - b)[np.isfinite(a) & np.isfinite(b)]
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if len(d) <= 16:
        signs = 1 - 2 * ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1)
        return float(np.mean(np.abs((signs * d).mean(axis=1)) >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 10_000):
        m = min(10_000, n_perm - start)
        signs = rng.choice((-1.0, 1.0), size=(m, len(d)))
        hits += int(np.sum(np.abs((signs * d).mean(axis=1)) >= observed - tol))
    return (hits + 1) / (n_perm + 1)


@dataclasses.dataclass
class GroundTruth:
    """Measured performances of one transfer-matrix protocol.

    perf[seed][(source, target)] and base[seed][target] (the target fine-tuned without
    an intermediate step); specs[target] is the task spec it was loaded from.
    :meth:`mean_perf` and :meth:`mean_base` average over the seeds that have the cell.
    """

    protocol_key: str
    protocol: dict[str, Any]
    metric: str
    tasks: list[str]
    seeds: list[int]
    perf: dict[int, dict[tuple[str, str], float]]
    base: dict[int, dict[str, float]]
    specs: dict[str, str]
    #: target -> the metric its cells hold when it differs from ``metric`` (regression
    #: targets have no accuracy; they are scored by ``regression_metric``)
    target_metrics: dict[str, str] = dataclasses.field(default_factory=dict)

    def mean_perf(self, target: str) -> dict[str, float]:
        """Source -> mean performance on ``target`` (sources with at least one seed)."""
        out = {}
        for s in self.tasks:
            vals = [self.perf[sd][(s, target)] for sd in self.seeds
                    if (s, target) in self.perf[sd]]
            if s != target and vals:
                out[s] = float(np.mean(vals))
        return out

    def mean_base(self, target: str) -> float:
        """Mean performance of ``target`` without an intermediate step (nan if none)."""
        vals = [self.base[sd][target] for sd in self.seeds if target in self.base[sd]]
        return float(np.mean(vals)) if vals else float("nan")

    def targets(self) -> list[str]:
        """Targets with a baseline and at least one source."""
        return [t for t in self.tasks if self.mean_perf(t) and np.isfinite(self.mean_base(t))]

    def gains(self) -> np.ndarray:
        """Float array of shape (n_tasks, n_tasks): mean gain of source i on target j,
        nan on the diagonal and for missing cells."""
        g = np.full((len(self.tasks), len(self.tasks)), np.nan)
        for j, t in enumerate(self.tasks):
            perf, b = self.mean_perf(t), self.mean_base(t)
            for i, s in enumerate(self.tasks):
                if s in perf:
                    g[i, j] = perf[s] - b
        return g

    def cell_std(self) -> float:
        """Std (ddof=1) of each cell and baseline across seeds, mean over cells."""
        stds = []
        keys = {k for sd in self.seeds for k in self.perf[sd]}
        for k in keys:
            v = [self.perf[sd][k] for sd in self.seeds if k in self.perf[sd]]
            if len(v) > 1:
                stds.append(np.std(v, ddof=1))
        for t in self.tasks:
            v = [self.base[sd][t] for sd in self.seeds if t in self.base[sd]]
            if len(v) > 1:
                stds.append(np.std(v, ddof=1))
        return float(np.mean(stds)) if stds else float("nan")

    def split_seed_oracle(self, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
        """regret@k of ranking by seed a's measurements, scored on seed b's (mean over
        ordered pairs a != b and targets): the regret the ground truth's noise alone
        causes. Keys ``"regret@k"``."""
        ks = tuple(ks)
        out: dict[str, list[float]] = {f"regret@{k}": [] for k in ks}
        for a, b in permutations(self.seeds, 2):
            for t in self.tasks:
                pa = {s: self.perf[a][(s, t)] for s in self.tasks if (s, t) in self.perf[a]}
                pb = {s: self.perf[b][(s, t)] for s in self.tasks if (s, t) in self.perf[b]}
                common = sorted(set(pa) & set(pb))
                if not common or t not in self.base[b]:
                    continue
                order = sorted(common, key=lambda s, pa=pa: (-pa[s], s))
                for k in ks:
                    out[f"regret@{k}"].append(regret_at_k(
                        {s: pb[s] for s in common}, order, k, baseline=self.base[b][t]))
        return {k: float(np.mean(v)) if v else float("nan") for k, v in out.items()}


def load_ground_truth(rows: Iterable[dict[str, Any]], *, protocol_key: str | None = None,
                      metric: str = "accuracy",
                      regression_metric: str = "pearson") -> GroundTruth:
    """The measured cells of one protocol from transfer-matrix result rows.

    rows: dicts with ``protocol_key``, ``protocol``, ``seed``, ``source`` (None for the
    no-intermediate-step baseline), ``target``, ``target_spec`` and the ``metric``
    (as ``benchmarks/transfer_matrix.py`` writes them). ``protocol_key`` picks one
    protocol when the rows hold several; a cell given twice keeps its first value.
    A target whose rows lack ``metric`` but carry ``regression_metric`` (a regression
    target: no accuracy) is scored by that (higher is better); it is recorded in
    ``target_metrics``.
    """
    rows = list(rows)
    keys = sorted({r["protocol_key"] for r in rows})
    if not keys:
        raise DataError("The results file holds no transfer-matrix rows.")
    if protocol_key is None:
        if len(keys) > 1:
            raise ConfigError(f"The results file holds several protocols {keys}; pick one "
                              f"with --protocol.")
        protocol_key = keys[0]
    rows = [r for r in rows if r["protocol_key"] == protocol_key]
    if not rows:
        raise ConfigError(f"No rows with protocol {protocol_key!r}; the file has {keys}.")
    if not any(metric in r for r in rows):
        raise ConfigError(f"Rows have no metric {metric!r}; they have "
                          f"{sorted(k for k, v in rows[0].items() if isinstance(v, float))}.")
    target_metrics: dict[str, str] = {}
    seeds = sorted({r["seed"] for r in rows})
    perf: dict[int, dict] = {s: {} for s in seeds}
    base: dict[int, dict] = {s: {} for s in seeds}
    specs: dict[str, str] = {}
    tasks: list[str] = []
    for r in rows:
        for name in (r["source"], r["target"]):
            if name is not None and name not in tasks:
                tasks.append(name)
        specs[r["target"]] = r["target_spec"]
        if r["source"] is None:
            store, key = base[r["seed"]], r["target"]
        else:
            store, key = perf[r["seed"]], (r["source"], r["target"])
        if key in store:
            logger.warning("Cell %s seed %s appears twice; keeping the first.", key, r["seed"])
            continue
        name = metric
        if metric not in r:
            if regression_metric not in r:
                raise ConfigError(f"Row {key} (seed {r['seed']}) has neither {metric!r} nor "
                                  f"{regression_metric!r}.")
            name = target_metrics[r["target"]] = regression_metric
        store[key] = float(r[name])
    return GroundTruth(protocol_key, rows[0]["protocol"], metric, sorted(tasks), seeds, perf,
                       base, specs, target_metrics)
