"""Smoke run of the stepstone side of ``benchmarks/bench_rank.py`` on a toy target.

hfselect is not installed in CI, so only the stepstone candidates run here: every
route the benchmark times must score the same maps to the same values.
"""

from __future__ import annotations

import numpy as np

from stepstone.esm.encoder import EncoderIdentity
from stepstone.selection.target import Target
from tests.conftest import load_benchmark

br = load_benchmark("bench_rank")


def test_every_stepstone_route_scores_the_same(monkeypatch) -> None:
    monkeypatch.setattr(br, "DIM", 16)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 16)).astype(np.float32)
    labels = np.arange(40) % 3
    target = Target("toy", X, labels, "classification", [""] * 40,
                    EncoderIdentity("toy", "", "mean", 128, None, 16))
    esms = br.stepstone_esms(br.synthetic_maps(6))
    scores = {name: br.run_candidate(name, target, esms, None)[1]
              for name in br.CANDIDATES if name != "hfselect"}
    assert set(scores) == {"stepstone", "stepstone-1thread", *br.ROUTES}
    for name, values in scores.items():
        assert values.shape == (6,) and np.all(np.isfinite(values)), name
        np.testing.assert_allclose(values, scores["stepstone"], rtol=1e-12, atol=1e-12)
    # The routes really differ in how they score, and leave the library as it was.
    from stepstone.selection import logme_maps

    assert logme_maps._TRIDIAGONAL_MAX_K == 32
    with br.stepstone_route("eigh"):
        assert logme_maps._maps_spectrum is br._maps_spectrum_eigh
    assert logme_maps._maps_spectrum is not br._maps_spectrum_eigh
