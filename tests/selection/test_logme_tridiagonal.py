"""ESM-LogME without eigenvectors: LAPACK through ctypes and the tridiagonal fixed point."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stepstone.selection import logme_maps
from stepstone.selection.logme import LogME, TargetBasis
from stepstone.selection.logme_evidence import logme_from_spectrum, logme_from_tridiagonal
from stepstone.selection.logme_maps import evidence_linear_maps
from stepstone.selection.nogil_lapack import (
    eigh_tridiagonal,
    eigvals_tridiagonal,
    solve_shifted_tridiagonal,
    tridiagonalize,
)

TIGHT = {"tol": 1e-12, "max_iter": 5000}


def _dense(diag: np.ndarray, off: np.ndarray) -> np.ndarray:
    return np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)


@pytest.mark.parametrize("m", [1, 2, 7, 40])
def test_tridiagonal_form_keeps_spectrum_and_quadratic_forms(m: int) -> None:
    rng = np.random.default_rng(m)
    A = rng.standard_normal((m + 3, m)) * np.geomspace(1, 1e-3, m)
    gram = A.T @ A
    x = rng.standard_normal((m, 3))
    diag, off, qx = tridiagonalize(gram.copy(), x)
    assert diag.shape == (m,) and off.shape == (m - 1,) and qx.shape == (m, 3)
    T = _dense(diag, off)
    expected = np.linalg.eigvalsh(gram)
    np.testing.assert_allclose(eigvals_tridiagonal(diag, off), expected, rtol=1e-10,
                               atol=1e-12 * expected.max())
    w, Z = eigh_tridiagonal(diag, off)
    np.testing.assert_allclose(Z @ np.diag(w) @ Z.T, T, atol=1e-12 * expected.max())
    # Q is orthogonal: x^T (gram + I)^-1 x = (Q^T x)^T (T + I)^-1 (Q^T x).
    np.testing.assert_allclose(qx.T @ np.linalg.solve(T + np.eye(m), qx),
                               x.T @ np.linalg.solve(gram + np.eye(m), x), rtol=1e-10)


def test_shifted_solves_match_dense_and_flag_indefinite_rows() -> None:
    rng = np.random.default_rng(3)
    rows, m = 6, 9
    diag = rng.uniform(1.0, 3.0, (rows, m))
    off = rng.uniform(-0.4, 0.4, (rows, m - 1))
    rhs = rng.standard_normal((rows, m))
    shift = rng.uniform(0.0, 2.0, rows)
    shift[4] = -10.0  # makes row 4 indefinite
    w, ok = solve_shifted_tridiagonal(diag, off, shift, rhs)
    assert ok.tolist() == [True] * 4 + [False, True]
    for i in np.flatnonzero(ok):
        expected = np.linalg.solve(_dense(diag[i], off[i]) + shift[i] * np.eye(m), rhs[i])
        np.testing.assert_allclose(w[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "r"), [(60, 12), (12, 12), (30, 1)])
def test_tridiagonal_evidence_equals_spectrum_evidence(n: int, r: int) -> None:
    """Same fixed point, same maxima, from T and Q^T c instead of eigenvectors,
    including the noise-free limit (r = n) and the alpha -> inf limit (y unrelated)."""
    rng = np.random.default_rng(n + r)
    k = 3
    B = 4
    s, diag, off, coords = [], [], [], []
    for _ in range(B):
        A = rng.standard_normal((r + 2, r)) * rng.uniform(0.2, 3.0, r)
        d, e, qc = tridiagonalize(A.T @ A, rng.standard_normal((r, k)))
        s.append(eigvals_tridiagonal(d, e))
        diag.append(d), off.append(e), coords.append(qc)
    s, diag, off, coords = map(np.stack, (s, diag, off, coords))
    coords[0, :, 2] *= 1e-9  # a column the features barely touch: alpha -> inf
    resid2 = rng.uniform(0.0, 2.0, (B, k)) if r < n else np.zeros((B, k))
    got = logme_from_tridiagonal(s, diag, off, coords, resid2, n=n, **TIGHT)
    proj = np.stack([eigh_tridiagonal(diag[i], off[i])[1].T @ coords[i] for i in range(B)])
    expected = logme_from_spectrum(s, proj, resid2, n=n, d=r, **TIGHT)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # Default tolerance: the same rounds on both sides.
    np.testing.assert_allclose(logme_from_tridiagonal(s, diag, off, coords, resid2, n=n),
                               logme_from_spectrum(s, proj, resid2, n=n, d=r), rtol=1e-9)


def _informative(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)
    X = np.eye(k)[labels] @ rng.standard_normal((k, d)) + 0.7 * rng.standard_normal((n, d))
    return X, labels


@pytest.mark.parametrize(("n", "d", "d_out", "k", "tridiagonal"), [
    (60, 12, 12, 3, True),  # r = d + 1 = d_out + 1: (r, r) side with one zero eigenvalue
    (60, 12, 20, 2, True),  # r < d_out
    (15, 30, 40, 4, True),  # r = n < d_out: the noise-free limit is possible
    (60, 12, 5, 3, False),  # r > d_out + 1: the (d_out, d_out) side, eigenvectors
    (80, 12, 12, 40, False),  # more columns than the solves pay for
])
def test_maps_route_choice_and_agreement(monkeypatch, n, d, d_out, k, tridiagonal) -> None:
    X, labels = _informative(n, d, k, seed=n + d_out)
    rng = np.random.default_rng(7)
    W = rng.standard_normal((5, d_out, d)) / math.sqrt(d)
    b = rng.standard_normal((5, d_out))
    basis = TargetBasis(X, labels)
    calls = []
    real = logme_maps.logme_from_tridiagonal
    monkeypatch.setattr(logme_maps, "logme_from_tridiagonal",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    fast = evidence_linear_maps(basis, W, b, n_jobs=2, batch_size=2, **TIGHT)
    assert (sum(calls) == 5) if tridiagonal else not calls
    explicit = np.array([LogME(**TIGHT).fit(X @ W[i].T + b[i], labels).evidence_
                         for i in range(5)])
    np.testing.assert_allclose(fast, explicit, rtol=1e-8)
    monkeypatch.setattr(logme_maps, "_TRIDIAGONAL_MAX_K", 0)
    np.testing.assert_allclose(evidence_linear_maps(basis, W, b, **TIGHT), fast, rtol=1e-10)


def test_singular_map_with_noise_free_limit_takes_the_eigenvectors(monkeypatch) -> None:
    """r = n and a rank-deficient map: the null space's share of y decides the
    noise-free limit, which only the eigenvectors show; that map is scored by them."""
    n, d = 15, 30
    X, labels = _informative(n, d, 3, seed=5)
    rng = np.random.default_rng(6)
    W = rng.standard_normal((3, 40, d)) / math.sqrt(d)
    W[1] = rng.standard_normal((40, 4)) @ rng.standard_normal((4, d))  # rank 4 < r = 15
    b = rng.standard_normal((3, 40))
    b[1] = 0.0
    basis = TargetBasis(X, labels)
    calls = []
    real = logme_maps.logme_from_tridiagonal
    monkeypatch.setattr(logme_maps, "logme_from_tridiagonal",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    got = evidence_linear_maps(basis, W, b, n_jobs=1, **TIGHT)
    assert calls == [2]
    explicit = np.array([LogME(**TIGHT).fit(X @ W[i].T + b[i], labels).evidence_
                         for i in range(3)])
    np.testing.assert_allclose(got, explicit, rtol=1e-8)
