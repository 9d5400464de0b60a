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
    "load_ground_truth",
    "ndcg_at_k",
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
                      metric: str = "accuracy") -> GroundTruth:
    """The measured cells of one protocol from transfer-matrix result rows.

    rows: dicts with ``protocol_key``, ``protocol``, ``seed``, ``source`` (None for the
    no-intermediate-step baseline), ``target``, ``target_spec`` and the ``metric``
    (as ``benchmarks/transfer_matrix.py`` writes them). ``protocol_key`` picks one
    protocol when the rows hold several; a cell given twice keeps its first value.
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
    if metric not in rows[0]:
        raise ConfigError(f"Rows have no metric {metric!r}; they have "
                          f"{sorted(k for k, v in rows[0].items() if isinstance(v, float))}.")
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
        store[key] = float(r[metric])
    return GroundTruth(protocol_key, rows[0]["protocol"], metric, sorted(tasks), seeds, perf,
                       base, specs)
