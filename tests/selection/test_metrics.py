"""Selection metrics against hand-computed values and their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepstone.esm.errors import ConfigError
from stepstone.selection.metrics import (
    load_ground_truth,
    ndcg_at_k,
    regret_at_k,
    spearman_gain,
)

PERF = {"a": 0.80, "b": 0.70, "c": 0.90}


def test_regret_at_k_hand_values():
    order = ["b", "a", "c"]
    assert regret_at_k(PERF, order, 1, baseline=0.85) == pytest.approx(100 * 0.2 / 0.9)
    assert regret_at_k(PERF, order, 2, baseline=0.85) == pytest.approx(100 * 0.1 / 0.9)
    assert regret_at_k(PERF, order, 3, baseline=0.85) == 0.0
    # No intermediate step beats every source: even the best source is charged for it.
    assert regret_at_k(PERF, ["c"], 1, baseline=1.0) == pytest.approx(10.0)
    assert regret_at_k(PERF, ["c"], 1) == 0.0
    # k beyond the list, and unknown names in the order, are harmless.
    assert regret_at_k(PERF, ["zz", "a"], 5) == pytest.approx(100 * 0.1 / 0.9)
    with pytest.raises(ConfigError, match="k >= 1"):
        regret_at_k(PERF, order, 0)


def test_ndcg_matches_the_formula():
    def dcg(rels):
        return sum(r / math.log2(i + 2) for i, r in enumerate(rels))

    rel = {"a": 0.1, "b": 0.0, "c": 0.2}  # perf - min(perf)
    order = ["b", "a", "c"]
    expected = dcg([rel[s] for s in order]) / dcg(sorted(rel.values(), reverse=True))
    assert ndcg_at_k(PERF, order, 5) == pytest.approx(expected)
    assert ndcg_at_k(PERF, ["c", "a", "b"], 5) == pytest.approx(1.0)
    assert ndcg_at_k(PERF, order, 1) == pytest.approx(0.0)
    assert ndcg_at_k({"a": 0.5, "b": 0.5}, ["b", "a"], 5) == 1.0


def test_spearman_with_gains():
    assert spearman_gain(PERF, ["c", "a", "b"], 0.85) == pytest.approx(1.0)
    assert spearman_gain(PERF, ["b", "a", "c"], 0.85) == pytest.approx(-1.0)
    # ranks of the order 3,2,1 vs. ranks of the gains 2,3,1: 1 - 6*2/(3*8) = 0.5
    assert spearman_gain(PERF, ["a", "c", "b"], 0.85) == pytest.approx(0.5)
    assert math.isnan(spearman_gain({"a": 0.5, "b": 0.5}, ["a", "b"], 0.4))


def _rows(values: dict[int, dict]) -> list[dict]:
    rows = []
    for seed, cells in values.items():
        for (src, tgt), acc in cells.items():
            rows.append({"protocol_key": "k", "protocol": {}, "seed": seed, "source": src,
                         "target": tgt, "target_spec": tgt, "accuracy": acc})
    return rows


def test_ground_truth_noise_and_oracle():
    rows = _rows({0: {("a", "T"): 0.8, ("b", "T"): 0.7, (None, "T"): 0.5},
                  1: {("a", "T"): 0.6, ("b", "T"): 0.9, (None, "T"): 0.5}})
    gt = load_ground_truth(rows)
    assert gt.targets() == ["T"]
    assert gt.mean_perf("T") == pytest.approx({"a": 0.7, "b": 0.8})
    assert gt.cell_std() == pytest.approx((np.std([.8, .6], ddof=1) * 2 + 0) / 3)
    # seed 0 picks a, worth .6 of a best .9 on seed 1; seed 1 picks b, .7 of .8 on seed 0
    oracle = gt.split_seed_oracle()
    assert oracle["regret@1"] == pytest.approx((100 * 0.3 / 0.9 + 100 * 0.1 / 0.8) / 2)
    assert oracle["regret@3"] == pytest.approx(0.0)
    g = gt.gains()
    assert g[gt.tasks.index("b"), gt.tasks.index("T")] == pytest.approx(0.3)
    assert np.isnan(g[gt.tasks.index("T"), gt.tasks.index("T")])
    with pytest.raises(ConfigError, match="several protocols"):
        load_ground_truth(rows + [{**rows[0], "protocol_key": "other"}])


def test_rankings_are_scored_as_given_and_unknown_sources_ignored():
    # a longer list with names the ground truth lacks scores like the list without them
    order = ["zz", "c", "yy", "a", "b"]
    clean = ["c", "a", "b"]
    assert regret_at_k(PERF, order, 1) == regret_at_k(PERF, clean, 1) == 0.0
    assert ndcg_at_k(PERF, order, 5) == ndcg_at_k(PERF, clean, 5) == pytest.approx(1.0)
    assert spearman_gain(PERF, order, 0.5) == pytest.approx(1.0)


def test_ground_truth_refuses_empty_rows_and_unknown_metric():
    from stepstone.esm.data import DataError

    with pytest.raises(DataError, match="no transfer-matrix rows"):
        load_ground_truth([])
    rows = _rows({0: {("a", "T"): 0.8, (None, "T"): 0.5}})
    with pytest.raises(ConfigError, match="no metric 'f1'"):
        load_ground_truth(rows, metric="f1")
    with pytest.raises(ConfigError, match="No rows with protocol 'x'"):
        load_ground_truth(rows, protocol_key="x")


def test_random_expectations_equal_the_mean_over_every_order():
    from itertools import permutations

    from stepstone.selection.metrics import random_ndcg_at_k, random_regret_at_k

    perf = {"a": 0.5, "b": 0.7, "c": 0.6, "d": 0.9, "e": 0.65}
    orders = [list(o) for o in permutations(perf)]
    for k in (1, 2, 3, 5, 9):
        for base in (None, 0.95):
            brute = np.mean([regret_at_k(perf, o, k, baseline=base) for o in orders])
            assert random_regret_at_k(perf, k, baseline=base) == pytest.approx(brute, abs=1e-9)
        brute = np.mean([ndcg_at_k(perf, o, k) for o in orders])
        assert random_ndcg_at_k(perf, k) == pytest.approx(brute, abs=1e-9)
    with pytest.raises(ConfigError, match="k >= 1"):
        random_regret_at_k(perf, 0)


def test_paired_permutation_test_exact_and_sampled():
    from stepstone.selection.metrics import paired_permutation_test

    # five differences all positive: only the all-plus and all-minus flips are as extreme
    assert paired_permutation_test([1, 2, 3, 4, 5], [0] * 5) == pytest.approx(2 / 32)
    assert paired_permutation_test([1, 2], [1, 2]) == 1.0  # no difference at all
    # symmetric differences: the observed mean is 0, every flip is as extreme
    assert paired_permutation_test([1, -1, 2, -2], [0] * 4) == 1.0
    rng = np.random.default_rng(1)
    d = rng.normal(0.5, 1.0, size=40)
    p = paired_permutation_test(d, np.zeros(40), n_perm=20_000)
    from scipy.stats import ttest_1samp

    # a large-sample sign-flip test agrees with the t test to within sampling error
    assert abs(p - ttest_1samp(d, 0.0).pvalue) < 0.01
    assert paired_permutation_test(rng.normal(0, 1, 40), np.zeros(40)) > 0.05
    with pytest.raises(ConfigError, match="equal lengths"):
        paired_permutation_test([1, 2], [1])


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_data():
    from stepstone.selection.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    small, large = rng.normal(1, 1, 10), rng.normal(1, 1, 400)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    assert all(math.isnan(x) for x in bootstrap_ci([1.0]))


def test_regression_targets_use_the_regression_metric():
    rows = _rows({0: {("a", "T"): 0.8, (None, "T"): 0.5}})
    reg = [{**r, "target": "R", "pearson": r["accuracy"] - 0.3} for r in rows]
    for r in reg:
        del r["accuracy"]
    gt = load_ground_truth(rows + reg)
    assert gt.target_metrics == {"R": "pearson"}
    assert gt.mean_base("R") == pytest.approx(0.2) and gt.mean_base("T") == 0.5
