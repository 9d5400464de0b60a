"""LogME (You et al. ICML 2021): brute-force evidence, thuml/LogME #23, invariants, fast path."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepstone.selection.logme import LogME, TargetBasis, feature_spectrum, logme_score
from stepstone.selection.logme_evidence import log_evidence, logme_fixed_point, logme_from_spectrum
from stepstone.selection.logme_maps import evidence_linear_maps, logme_linear_maps

TIGHT = {"tol": 1e-12, "max_iter": 5000}
SHAPES = [(40, 12), (12, 40), (20, 20)]  # n > d, n < d, n == d


def brute_evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y | 0, beta^-1 I + alpha^-1 F F^T) / n from the n x n covariance."""
    n = F.shape[0]
    cov = np.eye(n) / beta + F @ F.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    quad = float(y @ np.linalg.solve(cov, y))
    return -0.5 * (n * math.log(2 * math.pi) + logdet + quad) / n


def reference_evidence(F: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The thuml/LogME evidence formula: log|A| summed over min(n, d) eigenvalues only."""
    n, d = F.shape
    u, s, vh = np.linalg.svd(F, full_matrices=False)
    sigma = s**2
    x = u.T @ y
    t = alpha / beta
    m2 = float((sigma * x**2 / (t + sigma) ** 2).sum())
    res2 = float((x**2 / (1 + sigma / t) ** 2).sum() + (y @ y - x @ x))
    ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
          - 0.5 * np.sum(np.log(alpha + beta * sigma))
          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return ev / n


def informative(n: int, d: int, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with some class signal, so alpha and beta have an interior optimum."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)
    F = np.eye(k)[labels] @ rng.standard_normal((k, d)) + 0.7 * rng.standard_normal((n, d))
    return F, labels


# --------------------------------------------------------------------------- brute force
@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_fixed_point_evidence_equals_brute_force(n: int, d: int) -> None:
    F, labels = informative(n, d)
    model = LogME(**TIGHT).fit(F, labels)
    Y = np.eye(3)[labels]
    for j in range(3):
        expected = brute_evidence(F, Y[:, j], model.alpha_[j], model.beta_[j])
        assert model.evidence_[j] == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert model.score_ == pytest.approx(model.evidence_.mean())


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_log_evidence_equals_brute_force_anywhere(n: int, d: int) -> None:
    rng = np.random.default_rng(1)
    F = rng.standard_normal((n, d))
    Y = rng.standard_normal((n, 2))
    sigma2, proj, resid2 = feature_spectrum(F, Y)
    for alpha, beta in [(1e-3, 5.0), (0.3, 0.2), (7.0, 1.0), (200.0, 30.0)]:
        got = log_evidence(sigma2, proj, resid2, alpha, beta, n=n, d=d)
        want = [brute_evidence(F, Y[:, j], alpha, beta) for j in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_fixed_point_maximises_brute_force_evidence(n: int, d: int) -> None:
    F, labels = informative(n, d, seed=2)
    y = (labels == 1).astype(float)
    model = LogME(**TIGHT).fit(F, labels)
    a, b = model.alpha_[1], model.beta_[1]
    best = brute_evidence(F, y, a, b)
    grid = np.exp(np.linspace(-0.5, 0.5, 9))
    values = np.array([[brute_evidence(F, y, a * ga, b * gb) for gb in grid] for ga in grid])
    assert values.max() <= best + 1e-10
    # Stationary: a step of 1e-4 (relative) changes the evidence to second order only.
    for da, db in [(1e-4, 0), (0, 1e-4)]:
        up = brute_evidence(F, y, a * math.exp(da), b * math.exp(db))
        down = brute_evidence(F, y, a * math.exp(-da), b * math.exp(-db))
        assert abs(up - down) < 1e-9


def test_prior_collapse_boundary_is_the_supremum() -> None:
    # Uninformative features: for column 0 the evidence only grows as alpha -> inf (m -> 0,
    # y ~ N(0, beta^-1 I) with beta = n / ||y||^2); the limit is taken, not a crawl.
    rng = np.random.default_rng(21)
    F = rng.standard_normal((60, 10))
    labels = rng.integers(0, 3, 60)
    y = (labels == 0).astype(float)
    model = LogME().fit(F, labels)
    beta = 60 / (y @ y)
    limit = 0.5 * math.log(beta) - 0.5 * math.log(2 * math.pi) - 0.5
    assert model.alpha_[0] > 1e15
    assert model.evidence_[0] == pytest.approx(limit, rel=1e-10)
    assert brute_evidence(F, y, 1e12, beta) == pytest.approx(limit, rel=1e-9)
    grid = np.exp(np.linspace(-6, 12, 10))
    assert max(brute_evidence(F, y, a, b * beta) for a in grid for b in (0.5, 1, 2)) <= limit
    np.testing.assert_allclose(LogME(max_iter=5).fit(F, labels).evidence_[0], limit, rtol=1e-10)


def test_noise_free_boundary_is_the_supremum_when_n_below_d() -> None:
    # n < d: y is in span(F) and the evidence can grow as beta -> inf towards
    # log N(y | 0, alpha^-1 F F^T); that limit is reported with beta = inf.
    F, labels = informative(12, 40, seed=3)
    model = LogME().fit(F, labels)
    assert np.all(np.isinf(model.beta_)) and np.all(np.isfinite(model.evidence_))
    sigma2, proj, resid2 = feature_spectrum(F, np.eye(3)[labels])
    again = log_evidence(sigma2, proj, resid2, model.alpha_, model.beta_, n=12, d=40)
    np.testing.assert_allclose(again, model.evidence_, rtol=1e-12)
    for j in range(3):
        y = (labels == j).astype(float)
        a = model.alpha_[j]
        assert brute_evidence(F, y, a, 1e13) == pytest.approx(model.evidence_[j], rel=1e-8)
        grid = [brute_evidence(F, y, a * ga, b) for ga in np.exp(np.linspace(-1, 1, 7))
                for b in (1.0, 1e2, 1e4, 1e6)]
        assert max(grid) <= model.evidence_[j] + 1e-12


# --------------------------------------------------------------------------- thuml/LogME #23
def test_reference_formula_is_wrong_when_n_below_d() -> None:
    F, labels = informative(12, 40, seed=3)
    y = (labels == 0).astype(float)
    sigma2, proj, resid2 = feature_spectrum(F, y)
    for alpha, beta in [(0.2, 3.0), (5.0, 1.0), (40.0, 50.0)]:
        truth = brute_evidence(F, y, alpha, beta)
        ours = log_evidence(sigma2, proj[:, :1], resid2[:1], alpha, beta, n=12, d=40)[0]
        buggy = reference_evidence(F, y, alpha, beta)
        assert ours == pytest.approx(truth, rel=1e-10)
        # The reference misses (d - n) log(alpha) / (2n) of the log-determinant.
        assert buggy - truth == pytest.approx((40 - 12) * math.log(alpha) / (2 * 12), rel=1e-6)
        assert abs(buggy - truth) > 0.1
    # At the fitted alpha the error is just as large, so rankings across d can flip.
    model = LogME(**TIGHT).fit(F, labels)
    assert model.evidence_[0] == pytest.approx(
        brute_evidence(F, y, model.alpha_[0], model.beta_[0]), rel=1e-10)
    assert (40 - 12) * math.log(model.alpha_[0]) / (2 * 12) > 1.0


def test_reference_formula_is_right_when_n_above_d() -> None:
    F, labels = informative(40, 12, seed=3)
    y = (labels == 0).astype(float)
    for alpha, beta in [(0.5, 2.0), (30.0, 1.5)]:
        assert reference_evidence(F, y, alpha, beta) == pytest.approx(
            brute_evidence(F, y, alpha, beta), rel=1e-10)


def test_matches_reference_fixed_point_when_n_above_d() -> None:
    """thuml/LogME's fit_fixed_point (1e-5 in its denominators) where it is correct."""
    F, labels = informative(60, 10, seed=4)
    y = (labels == 2).astype(float)
    n, d = F.shape
    u, s, _ = np.linalg.svd(F, full_matrices=False)
    sigma = s**2
    x2 = (u.T @ y) ** 2
    res_x2 = y @ y - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(100):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum()
        m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
        res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
        alpha = gamma / (m2 + 1e-5)
        beta = (n - gamma) / (res2 + 1e-5)
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2 * res2
                    - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)) / n
        if abs(alpha / beta - t) / t <= 1e-3:
            break
    assert LogME().fit(F, labels).evidence_[2] == pytest.approx(evidence, rel=1e-4)


# --------------------------------------------------------------------------- invariants
def test_row_permutation_and_class_renaming_do_not_change_the_score() -> None:
    F, labels = informative(50, 8, k=4, seed=5)
    base = logme_score(F, labels)
    perm = np.random.default_rng(0).permutation(50)
    assert logme_score(F[perm], labels[perm]) == pytest.approx(base, rel=1e-12)
    renamed = np.array([7, 3, 11, 0])[labels]
    assert logme_score(F, renamed) == pytest.approx(base, rel=1e-12)
    names = np.array(["pos", "neg", "neutral", "mixed"])[labels]
    assert logme_score(F, names) == pytest.approx(base, rel=1e-12)
    model = LogME().fit(F, names)
    assert sorted(model.classes_.tolist()) == ["mixed", "neg", "neutral", "pos"]


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_feature_scale_rotation_and_zero_columns_do_not_change_the_evidence(n: int, d: int
                                                                            ) -> None:
    # The marginal N(y | 0, beta^-1 I + alpha^-1 F F^T) depends on F only via F F^T, and
    # a scale c is absorbed by alpha -> alpha / c^2 at the optimum.
    F, labels = informative(n, d, seed=6)
    base = LogME(**TIGHT).fit(F, labels).evidence_
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))
    variants = {
        "scaled": 37.0 * F,
        "tiny": 1e-3 * F,
        "rotated": F @ q,
        "zero columns": np.hstack([F, np.zeros((n, 25))]),
        "every column twice": np.hstack([F, F]),
    }
    for name, G in variants.items():
        got = LogME(**TIGHT).fit(G, labels).evidence_
        np.testing.assert_allclose(got, base, rtol=1e-7, err_msg=name)


def test_regression_target_scale_shifts_evidence_by_log_scale() -> None:
    rng = np.random.default_rng(7)
    F = rng.standard_normal((30, 6))
    y = F @ rng.standard_normal(6) + 0.5 * rng.standard_normal(30)
    base = LogME(label_kind="regression", **TIGHT).fit(F, y).score_
    scaled = LogME(label_kind="regression", **TIGHT).fit(F, 10.0 * y).score_
    assert scaled == pytest.approx(base - math.log(10.0), rel=1e-8)


def test_signal_scores_higher_than_noise() -> None:
    F, labels = informative(200, 16, seed=8)
    noise = np.random.default_rng(8).standard_normal(F.shape)
    assert logme_score(F, labels) > logme_score(noise, labels)


def test_regression_multi_output_is_per_column() -> None:
    rng = np.random.default_rng(9)
    F = rng.standard_normal((25, 5))
    Y = rng.standard_normal((25, 3))
    model = LogME(label_kind="regression", **TIGHT).fit(F, Y)
    assert model.evidence_.shape == model.alpha_.shape == model.beta_.shape == (3,)
    for j in range(3):
        single = LogME(label_kind="regression", **TIGHT).fit(F, Y[:, j])
        assert single.score_ == pytest.approx(model.evidence_[j], rel=1e-12)
        assert brute_evidence(F, Y[:, j], model.alpha_[j], model.beta_[j]) == pytest.approx(
            model.evidence_[j], rel=1e-10)


def test_spectrum_routine_is_batched() -> None:
    rng = np.random.default_rng(10)
    sigma2 = rng.uniform(0.0, 5.0, (2, 3, 6))
    sigma2[0, 0, -2:] = 0.0  # zeros are allowed
    proj = rng.standard_normal((2, 3, 6, 4))
    resid2 = rng.uniform(0.0, 3.0, (2, 3, 4))
    batched = logme_from_spectrum(sigma2, proj, resid2, n=20, d=9)
    assert batched.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            one = logme_from_spectrum(sigma2[i, j], proj[i, j], resid2[i, j], n=20, d=9)
            np.testing.assert_allclose(batched[i, j], one, rtol=1e-13)


def test_no_signal_features_give_the_pure_noise_model() -> None:
    # With F = 0 only beta matters: y ~ N(0, beta^-1 I) with beta = n / ||y||^2.
    y = np.array([1.0, -2.0, 0.5, 3.0])
    fit = logme_fixed_point(np.zeros(0), np.zeros((0, 1)), np.array([y @ y]), n=4, d=3)
    beta = 4 / (y @ y)
    expected = 0.5 * math.log(beta) - 0.5 * math.log(2 * math.pi) - 0.5
    assert fit.converged[0] and fit.beta[0] == pytest.approx(beta)
    assert fit.evidence[0] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- affine maps
def _explicit(X, labels, W, b, **kw):
    return np.array([LogME(**kw).fit(X @ W[i].T + b[i], labels).evidence_
                     for i in range(W.shape[0])])


@pytest.mark.parametrize(("n", "d", "d_out"), [
    (60, 12, 12),  # r = d + 1 > d_out: the (d_out, d_out) side
    (60, 12, 20),  # r <= d_out: (r, r) side
    (60, 12, 5),
    (15, 30, 10),  # n < d
    (15, 30, 40),
])
def test_linear_maps_equal_explicit_logme(n: int, d: int, d_out: int) -> None:
    X, labels = informative(n, d, k=3, seed=11)
    rng = np.random.default_rng(12)
    W = rng.standard_normal((3, d_out, d)) / math.sqrt(d)
    b = rng.standard_normal((3, d_out))
    basis = TargetBasis(X, labels)
    assert basis.rank == basis.full_rank == min(n, d + 1)
    fast = evidence_linear_maps(basis, W, b, **TIGHT)
    np.testing.assert_allclose(fast, _explicit(X, labels, W, b, **TIGHT), rtol=1e-8)
    no_bias = evidence_linear_maps(basis, W, None, **TIGHT)
    np.testing.assert_allclose(no_bias, _explicit(X, labels, W, 0 * b, **TIGHT), rtol=1e-8)
    # Default tolerance: same iterations on both sides, so still agreeing closely.
    np.testing.assert_allclose(logme_linear_maps(basis, W, b),
                               _explicit(X, labels, W, b).mean(axis=1), rtol=1e-6)


def test_linear_maps_threads_batches_and_regression() -> None:
    rng = np.random.default_rng(13)
    X = rng.standard_normal((50, 8))
    Y = X @ rng.standard_normal((8, 2)) + rng.standard_normal((50, 2))
    W = rng.standard_normal((7, 8, 8))
    b = rng.standard_normal((7, 8))
    basis = TargetBasis(X, Y, label_kind="regression")
    serial = evidence_linear_maps(basis, W, b, n_jobs=1, batch_size=7, **TIGHT)
    threaded = evidence_linear_maps(basis, W, b, n_jobs=2, batch_size=2, **TIGHT)
    np.testing.assert_allclose(threaded, serial, rtol=1e-12)
    explicit = np.array([LogME(label_kind="regression", **TIGHT).fit(X @ w.T + c, Y).evidence_
                         for w, c in zip(W, b, strict=True)])
    np.testing.assert_allclose(serial, explicit, rtol=1e-8)
    assert logme_linear_maps(basis, W[:0], b[:0]).shape == (0,)


@pytest.mark.parametrize(("n", "d", "d_out", "k"), [
    (60, 12, 12, 3),  # (d_out, d_out) side, square triangular loadings
    (60, 12, 20, 2),  # (r, r) side
    (15, 30, 10, 4),  # n < d: trapezoidal loadings
    (40, 6, 1, 2),  # one output dimension: a 1 x 1 eigenproblem
])
def test_threads_and_chunking_do_not_change_scores(n: int, d: int, d_out: int, k: int) -> None:
    X, labels = informative(n, d, k=k, seed=21)
    rng = np.random.default_rng(22)
    W = rng.standard_normal((9, d_out, d)) / math.sqrt(d)
    b = rng.standard_normal((9, d_out))
    basis = TargetBasis(X, labels)
    # The single-threaded reference: one thread, all maps in one batch.
    serial = evidence_linear_maps(basis, W, b, n_jobs=1, batch_size=9)
    np.testing.assert_allclose(serial, _explicit(X, labels, W, b), rtol=1e-6)
    for n_jobs, batch_size in [(2, 1), (2, 4), (3, 2), (1, 1), (4, 9)]:
        got = evidence_linear_maps(basis, W, b, n_jobs=n_jobs, batch_size=batch_size)
        np.testing.assert_allclose(got, serial, rtol=1e-9, atol=0)
    # Splitting the maps between calls (as the scorer's chunks do) changes nothing either.
    parts = np.concatenate([evidence_linear_maps(basis, W[i:i + 4], b[i:i + 4])
                            for i in range(0, 9, 4)])
    np.testing.assert_allclose(parts, serial, rtol=1e-9, atol=0)


@pytest.mark.parametrize("m", [1, 2, 7, 40])
def test_gram_spectrum_equals_full_eigendecomposition(m: int) -> None:
    from scipy.linalg import blas

    from stepstone.selection.logme_maps import _gram_spectrum

    rng = np.random.default_rng(m)
    N = rng.standard_normal((m, m + 3)) * np.geomspace(1, 1e-4, m)[:, None]
    x = rng.standard_normal((m, 3))
    s, E = np.linalg.eigh(N @ N.T)
    got_s, got_proj = _gram_spectrum(blas.dsyrk(1.0, N, lower=1), x)
    np.testing.assert_allclose(got_s, s, rtol=1e-12, atol=1e-12 * s.max())
    # Eigenvectors are defined up to sign: compare |E^T x|.
    np.testing.assert_allclose(np.abs(got_proj), np.abs(E.T @ x), rtol=1e-9, atol=1e-12)


def test_thread_count_from_argument_or_environment(monkeypatch) -> None:
    from stepstone.selection.logme_maps import THREADS_ENV, default_n_jobs

    monkeypatch.setenv(THREADS_ENV, "3")
    assert default_n_jobs() == 3
    monkeypatch.setenv(THREADS_ENV, "0")
    with pytest.raises(ValueError, match=r"\$STEPSTONE_THREADS must be a positive integer"):
        default_n_jobs()
    monkeypatch.delenv(THREADS_ENV)
    assert default_n_jobs() >= 1
    X, labels = informative(20, 5)
    with pytest.raises(ValueError, match="'n_jobs' must be None or a positive integer"):
        logme_linear_maps(TargetBasis(X, labels), np.ones((2, 3, 5)), n_jobs=0)


def test_low_rank_approximation() -> None:
    rng = np.random.default_rng(14)
    n, d = 80, 20
    # A target with 6 strong directions and 14 weak ones; noisy labels from the strong.
    G = rng.standard_normal((n, d))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    X = (G * np.where(np.arange(d) < 6, 3.0, 0.05)) @ V.T
    labels = (G[:, 0] + 0.8 * rng.standard_normal(n) > 0).astype(int) + (G[:, 1] > 0.5)
    W = rng.standard_normal((4, d, d)) / math.sqrt(d)
    b = rng.standard_normal((4, d))
    exact = logme_linear_maps(TargetBasis(X, labels), W, b, **TIGHT)
    full = TargetBasis(X, labels, rank=10_000)
    assert full.rank == full.full_rank == d + 1
    np.testing.assert_allclose(logme_linear_maps(full, W, b, **TIGHT), exact, rtol=1e-12)
    approx = TargetBasis(X, labels, rank=8)  # the 6 strong directions, bias and one more
    assert approx.rank == 8 and approx.coords.shape == (8, 3)
    np.testing.assert_allclose(logme_linear_maps(approx, W, b, **TIGHT), exact, atol=2e-3)
    coarse = logme_linear_maps(TargetBasis(X, labels, rank=2), W, b, **TIGHT)
    assert np.abs(coarse - exact).max() > 0.05  # dropping strong directions shows


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("features", "labels", "kind", "message"), [
    (np.full((4, 2), np.nan), [0, 1, 0, 1], "classification", "finite"),
    (np.ones((4, 2)), [1, 1, 1, 1], "classification", "at least 2 classes"),
    (np.ones((4, 2)), [0, 1, 0], "classification", "one entry per row"),
    (np.ones(4), [0, 1, 0, 1], "classification", "2-D"),
    (np.ones((4, 2)), [0, 1, 0, 1], "foo", "'label_kind' must be one of"),
    (np.ones((4, 2)), ["a", "b", "a", "b"], "regression", "numeric"),
    (np.ones((4, 2)), [0.0, 1.0, np.nan, 1.0], "regression", "finite"),
    (np.ones((4, 2)), [0.0, 0.0, 0.0, 0.0], "regression", "identically zero"),
    (np.ones((4, 2)), [0.0, 1.0, np.nan, 1.0], "classification", "NaN"),
    (np.ones((4, 2)), np.zeros((4, 2), dtype=int), "classification", "1-D"),
])
def test_logme_rejects_bad_input(features, labels, kind, message) -> None:
    with pytest.raises(ValueError, match=message):
        LogME(label_kind=kind).fit(np.asarray(features), np.asarray(labels))


def test_spectrum_and_maps_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="at most min"):
        logme_from_spectrum(np.ones(5), np.ones((5, 1)), np.ones(1), n=10, d=4)
    with pytest.raises(ValueError, match="non-negative"):
        logme_from_spectrum(-np.ones(2), np.ones((2, 1)), np.ones(1), n=10, d=4)
    with pytest.raises(ValueError, match="shapes"):
        logme_from_spectrum(np.ones(2), np.ones((3, 1)), np.ones(1), n=10, d=4)
    X, labels = informative(20, 5)
    basis = TargetBasis(X, labels)
    with pytest.raises(ValueError, match=r"'weights' must be \(B, d_out, 5\)"):
        logme_linear_maps(basis, np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="'biases' must be"):
        logme_linear_maps(basis, np.ones((2, 3, 5)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="'rank' must be"):
        TargetBasis(X, labels, rank=0)
    with pytest.raises(TypeError, match="TargetBasis"):
        logme_linear_maps(X, np.ones((2, 3, 5)))  # type: ignore[arg-type]
