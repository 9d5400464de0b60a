"""The ESM sketch index (first stage of a ranking): math, persistence, registry agreement,
the K-best rule of ``--prefilter`` (issue 18) and recall on a small synthetic registry."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from stepstone.esm.model import EmbeddingSpaceMap, ESMConfig
from stepstone.esm.registry import Registry
from stepstone.selection.index import (
    SKETCH_META,
    SketchIndex,
    check_indexes,
    first_stage,
    sketch_index,
    update_indexes,
)
from stepstone.selection.logme import LogME, TargetBasis
from stepstone.selection.logme_maps import logme_linear_maps
from stepstone.selection.sketch import (
    MIDDLE_STAGE_POOL,
    _pack,
    _unpack,
    fit_sketch_basis,
    middle_stage_pool,
    sketch_logme,
    sketch_maps,
    target_query,
)


def _maps(n, d, seed):
    """Linear maps with the shape of real ESMs: a shared shrinking part plus a
    map-specific low-rank part (see benchmarks/bench_first_stage.py for the fitted one)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(d, d)) / np.sqrt(d)
    W = np.stack([shared * rng.uniform(0.5, 1.5) + rng.normal(size=(d, 4)) @ rng.normal(
        size=(4, d)) / d * rng.uniform(0.5, 3) for _ in range(n)])
    return W, 0.1 * rng.normal(size=(n, d))


def _target(n, d, k, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, d))[y] * 0.7 + rng.normal(size=(n, d))
    return X, y


def test_pack_gives_trace_inner_product():
    rng = np.random.default_rng(0)
    A, H = rng.normal(size=(2, 6, 6))
    A, H = A + A.T, H + H.T
    assert np.isclose(_pack(A) @ _pack(H), np.trace(A @ H))


def test_unpack_inverts_pack():
    rng = np.random.default_rng(1)
    H = rng.normal(size=(3, 5, 5))
    H = H + np.swapaxes(H, 1, 2)
    np.testing.assert_allclose(_unpack(_pack(H), 5), H)


def test_sketch_logme_is_logme_of_the_projected_features():
    """Golden value: LogME (the estimator) of the explicit features ``X1 Q L`` with
    ``L L^T = H``, the sketch's Gram on a compressed basis."""
    d = 12
    W, b = _maps(4, d, 0)
    basis = fit_sketch_basis(W, b, rank=5)
    X, y = _target(80, d, 3, 2)
    sketches = sketch_maps(basis, W, b)
    got = sketch_logme(basis, X, y, sketches)
    Xq = np.c_[X, np.ones(len(X))] @ basis.basis
    for i, H in enumerate(_unpack(sketches.astype(np.float64), basis.rank)):
        lam, V = np.linalg.eigh(H)
        F = Xq @ (V * np.sqrt(np.maximum(lam, 0.0)))
        assert np.isclose(got[i], LogME().fit(F, y).score_, rtol=1e-6)
    # rows are independent: a batch of one gives the same score
    assert np.isclose(sketch_logme(basis, X, y, sketches[2:3], batch_size=1)[0], got[2])


def test_middle_stage_pool_shrinks_with_label_columns_but_keeps_k():
    two = np.arange(40) % 2
    assert middle_stage_pool(two, 10) == MIDDLE_STAGE_POOL
    assert middle_stage_pool(np.arange(160) % 16, 10) == MIDDLE_STAGE_POOL // 2
    assert middle_stage_pool(np.arange(10_000) % 5000, 300) == 300
    assert middle_stage_pool(np.zeros((5, 3)), 1, label_kind="regression") == MIDDLE_STAGE_POOL


def test_sketch_is_scale_invariant_and_query_has_sketch_dim():
    W, b = _maps(5, 12, 0)
    basis = fit_sketch_basis(W, b, rank=6)
    np.testing.assert_allclose(sketch_maps(basis, 3 * W, 3 * b), sketch_maps(basis, W, b),
                               rtol=1e-5)
    X, y = _target(60, 12, 3, 1)
    assert target_query(basis, X, y).shape == (basis.dim,) == (21,)


def _esm(identity, W, b, task_id):
    d = identity.dim
    esm = EmbeddingSpaceMap(ESMConfig(encoder=dataclasses.asdict(identity), task_id=task_id,
                                      in_dim=d, out_dim=d))
    with torch.no_grad():
        esm.linear.weight.copy_(torch.as_tensor(W))
        esm.linear.bias.copy_(torch.as_tensor(b))
    return esm


def _registry(tmp_path, identity, n, seed=0):
    reg = Registry(tmp_path, "w", create=True)
    W, b = _maps(n, identity.dim, seed)
    for i in range(n):
        reg.add(_esm(identity, W[i], b[i], f"t{i}"), esm_id=f"t{i:02d}", settings_key=f"k{i}")
    return reg


def test_first_stage_keeps_the_k_best_among_candidates(tmp_path, tiny_encoder):
    """Issue 18: --prefilter K kept K + 1 nearest sources, then cut them by name."""
    reg = _registry(tmp_path, tiny_encoder.identity, 12)
    X, y = _target(80, tiny_encoder.identity.dim, 3, 5)
    index = sketch_index(reg)
    entries = reg.entries()
    candidates = entries[1:]  # e.g. the target's own ESM excluded
    # 11 candidates < MIDDLE_STAGE_POOL: the middle stage orders all of them
    mid = sketch_logme(index.basis, X, y, np.stack([index.vector(e.id) for e in candidates]))
    brute = [candidates[j] for j in np.argsort(-mid, kind="stable")]
    for k in (1, 3, 7):
        got = first_stage(reg, X, y, candidates, k)
        assert [e.id for e in got] == [e.id for e in brute[:k]]
    assert len(first_stage(reg, X, y, candidates, 50)) == len(candidates)


def test_sketch_index_follows_registry_and_verify_agrees(tmp_path, tiny_encoder):
    reg = _registry(tmp_path, tiny_encoder.identity, 6)
    update_indexes(reg)
    assert check_indexes(reg) == []
    stored = SketchIndex.load(tmp_path, mmap=True)
    assert stored.mapped and len(stored) == 6
    basis = stored.basis.basis.copy()
    # every index file gets the same (umask) mode: a registry others read is readable
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("esm_index*")}
    assert len(modes) == 3 and len(set(modes.values())) == 1, modes
    reg.remove("t01")
    W, b = _maps(1, tiny_encoder.identity.dim, 9)
    reg.add(_esm(tiny_encoder.identity, W[0], b[0], "new"), esm_id="new", settings_key="kn")
    update_indexes(reg)
    updated = sketch_index(reg)
    assert sorted(updated.ids.values()) == ["new", "t00", "t02", "t03", "t04", "t05"]
    np.testing.assert_array_equal(updated.basis.basis, basis)  # incremental, same basis
    expected = sketch_maps(updated.basis, *reg.load_esm("new").affine())[0]
    np.testing.assert_allclose(updated.vector("new"), expected, rtol=1e-6)
    assert check_indexes(reg) == []
    # an index that claims the current generation but lacks an ESM is reported
    meta = json.loads((tmp_path / SKETCH_META).read_text())
    meta["ids"] = {k: v for k, v in meta["ids"].items() if v != "new"}
    (tmp_path / SKETCH_META).write_text(json.dumps(meta))
    problems = check_indexes(reg)
    assert len(problems) == 1 and problems[0].startswith("esm_index")


def test_recall_on_small_synthetic_registry():
    """With a basis that spans the inputs the middle stage is ESM-LogME itself, so it
    must keep the exact best sources at small K; the first-order inner product on the
    same sketches does not (it misses the exact top-1 at K = 1 most of the time here:
    the maps differ too much for a linear model, as real ESMs do). The benchmark
    measures both recall curves on real ESMs and on a large fitted synthetic registry."""
    d, n_maps = 24, 80
    W, b = _maps(n_maps, d, 3)
    basis = fit_sketch_basis(W, b, rank=d + 1)
    sketches = sketch_maps(basis, W, b)
    recall = {"middle": [], "first_order": []}
    for t in range(12):
        X, y = _target(150, d, 2 + t % 4, 100 + t)
        best5 = np.argsort(-logme_linear_maps(TargetBasis(X, y), W, b))[:5]
        for name, score in (("middle", sketch_logme(basis, X, y, sketches)),
                            ("first_order", sketches @ target_query(basis, X, y))):
            order = np.argsort(-score)
            recall[name].append((best5[0] == order[0], len(set(best5) & set(order[:8])) / 5))
    middle, first = np.mean(recall["middle"], axis=0), np.mean(recall["first_order"], axis=0)
    assert middle[0] >= 0.9 and middle[1] >= 0.95  # top-1 at K = 1, top-5 at K = 8
    assert first[0] <= 0.6 and middle[1] > first[1]


@pytest.mark.parametrize("k", [0, -1])
def test_first_stage_refuses_bad_k(tmp_path, tiny_encoder, k):
    reg = _registry(tmp_path, tiny_encoder.identity, 2)
    with pytest.raises(ValueError, match="'k' must be >= 1"):
        first_stage(reg, np.zeros((4, tiny_encoder.identity.dim)), np.array([0, 1, 0, 1]),
                    reg.entries(), k)


def test_cli_remove_updates_the_index_and_verify_checks_it(tmp_path, tiny_encoder, capsys):
    from stepstone.cli import main

    reg = _registry(tmp_path, tiny_encoder.identity, 4)
    update_indexes(reg)
    reg.close()
    assert main(["registry", "remove", "--registry", str(tmp_path), "t02"]) == 0
    stored = SketchIndex.load(tmp_path)
    assert sorted(stored.ids.values()) == ["t00", "t01", "t03"]  # updated by the CLI
    assert main(["registry", "verify", "--registry", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / SKETCH_META).read_text())
    meta["ids"]["12345"] = "ghost"
    (tmp_path / SKETCH_META).write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["registry", "verify", "--registry", str(tmp_path)]) == 1
    assert "esm_index" in capsys.readouterr().out
