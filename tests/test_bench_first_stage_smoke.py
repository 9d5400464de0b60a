"""Smoke run of benchmarks/bench_first_stage.py on tiny maps and targets (no encoder)."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_benchmark

fs = load_benchmark("bench_first_stage")


def _tiny(d=12, n_maps=9, n_targets=3):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(n_maps, d, d)) / np.sqrt(d) + np.eye(d)
    esms = {"tasks": [f"t{i}" for i in range(n_maps)], "W": W,
            "b": 0.1 * rng.normal(size=(n_maps, d)),
            "vectors": [rng.normal(size=d).astype(np.float32) for _ in range(n_maps - 1)]
            + [None]}
    targets = {}
    for t in range(n_targets):
        y = rng.integers(0, 3, 40)
        X = rng.normal(size=(3, d))[y] + rng.normal(size=(40, d))
        targets[f"t{t}"] = (X, y, (X.mean(0) / np.linalg.norm(X.mean(0))).astype(np.float32))
    return esms, targets


def test_bench_first_stage_parts_and_plot(tmp_path):
    esms, targets = _tiny()
    a = fs.part_a(esms, targets, rank=5)
    assert a["esms"] == 9 and set(a["per_target"]) == set(targets)
    for k, r in a["recall"].items():
        assert 0.0 <= r["top5"] <= 1.0 and 0.0 <= r["top1"] <= 1.0, k
    W, b = fs.synthetic_maps(esms, 20, residual=0.5)
    assert W.shape == (20, 12, 12) and b.shape == (20, 12) and np.isfinite(W).all()
    bpart = fs.part_b(esms, targets, 30, rank=5, residual=0.5)
    assert bpart["esms"] == 30 and bpart["recall"][25]["top1"] <= 1.0
    d = fs.part_d(esms, targets, ranks=(4,))
    assert d["float32"]["min_tau"] > 0.999 and d["float16"]["bytes_per_esm"] == 2 * (144 + 12)
    path = tmp_path / "fs.png"
    fs.plot({"A": a, "B": bpart}, path)
    assert path.stat().st_size > 0
