"""The one sampler: stratified, balanced, per-class and uniform samples of row indices."""

from __future__ import annotations

import numpy as np
import pytest

from stepstone.esm.data import DataError, Split
from stepstone.esm.errors import ConfigError
from stepstone.esm.sampling import (
    balanced_quotas,
    holdout_indices,
    per_class_indices,
    sample_indices,
    stratified_quotas,
    uniform_indices,
)


def _counts(labels, keep):
    got = [labels[i] for i in keep]
    return {c: got.count(c) for c in sorted(set(labels))}


def test_stratified_sample_is_sorted_seeded_and_proportional():
    labels = ["a"] * 700 + ["b"] * 200 + ["c"] * 100
    keep = sample_indices(labels, 500, seed=0)
    assert keep.tolist() == sorted(set(keep.tolist())) and len(keep) == 500
    assert np.array_equal(keep, sample_indices(labels, 500, seed=0))
    assert not np.array_equal(keep, sample_indices(labels, 500, seed=1))
    assert _counts(labels, keep) == {"a": 350, "b": 100, "c": 50}


def test_stratified_sample_keeps_every_class():
    labels = ["a"] * 990 + ["b"] * 9 + ["c"]
    for ties in ("quicksort", "stable"):
        got = _counts(labels, sample_indices(labels, 100, seed=0, ties=ties))
        assert sum(got.values()) == 100 and got["c"] == 1 and got["b"] >= 1


def test_stratified_quotas_are_largest_remainder_with_a_floor_of_one():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 60, size=rng.integers(2, 30))
        limit = int(rng.integers(len(counts), counts.sum()))
        for ties in ("quicksort", "stable"):
            quota = stratified_quotas(counts, limit, ties=ties)
            assert quota.sum() == limit and (quota >= 1).all() and (quota <= counts).all()
            # unless the floor of one overshoots, each share rounds the exact one
            exact = counts * limit / counts.sum()
            if np.maximum(1, np.floor(exact)).sum() <= limit:
                assert (np.abs(quota - exact) < 1 + (exact < 1)).all()


def test_ties_order_only_matters_beyond_sixteen_classes():
    # numpy's default argsort is an insertion sort (so stable) up to 16 elements
    counts = np.array([7] * 16)
    assert np.array_equal(stratified_quotas(counts, 40), stratified_quotas(counts, 40,
                                                                             ties="stable"))
    assert stratified_quotas(np.array([7] * 40), 100, ties="stable").tolist() == \
        [3] * 20 + [2] * 20


def test_balanced_sample_gives_equal_shares_and_keeps_small_classes_whole():
    labels = ["a"] * 700 + ["b"] * 200 + ["c"] * 100
    keep = sample_indices(labels, 500, seed=0, balance=True)
    assert _counts(labels, keep) == {"a": 200, "b": 200, "c": 100}
    assert balanced_quotas(np.array([10, 10, 10]), 10).tolist() == [4, 3, 3]


def test_regression_and_small_inputs():
    values = np.linspace(0, 1, 50)
    keep = sample_indices(values, 10, seed=3, label_kind="regression")
    assert np.array_equal(keep, uniform_indices(50, 10, seed=3))
    assert np.array_equal(keep, np.sort(np.random.default_rng(3).choice(50, 10, replace=False)))
    assert np.array_equal(sample_indices(values, 80), np.arange(50))
    with pytest.raises(ConfigError, match="positive integer; got 0"):
        sample_indices(values, 0)


def test_per_class_shots():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 6)
    keep = per_class_indices(labels, 3, seed=0)
    assert np.bincount(labels[keep]).tolist() == [3, 2, 3]
    assert np.array_equal(keep, per_class_indices(labels, 3, seed=0))
    with pytest.raises(ConfigError, match="'shots' must be >= 1"):
        per_class_indices(labels, 0)


def test_task_subsample_is_this_sampler(small_task):
    small = small_task.subsample(max_train=10, seed=4)
    expected = small_task.train.take(sample_indices(small_task.train.labels, 10, seed=4))
    assert small.train.texts == expected.texts
    assert small_task.subsample(max_train=10 ** 6) is small_task
    with pytest.raises(DataError, match="positive integer"):
        small_task.subsample(max_train=0)
    assert isinstance(small.train, Split)


def test_holdout_takes_a_share_of_every_class_and_leaves_rows_on_both_sides():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2 + [3])
    held = holdout_indices(labels, 0.3, seed=5)
    assert np.all(np.diff(held) > 0)
    assert np.bincount(labels[held], minlength=4).tolist() == [3, 1, 1, 0]
    assert holdout_indices(labels, 0.3, seed=5).tolist() == held.tolist()
    assert holdout_indices(labels, 0.3, seed=6).tolist() != held.tolist()
    reg = holdout_indices(np.linspace(0, 1, 20), 0.25, seed=0, label_kind="regression")
    assert len(reg) == 5
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        holdout_indices(labels, 1.0)
