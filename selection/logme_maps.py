"""ESM-LogME's fast path: LogME after many affine maps of one target's embeddings.

For affine maps ``z = W x + b`` (linear and low-rank ESMs, Schulte et al. 2024) of
shared target embeddings ``X``, the LogME evidence (You et al. ICML 2021) of
``Z = [X, 1] [W, b]^T`` follows from the target's decomposition
(:class:`~stepstone.selection.logme.TargetBasis`) and one small symmetric matrix per
map, so ``Z`` is never formed; the evidence then comes from the same fixed point as
every other LogME entry point (:mod:`~stepstone.selection.logme_evidence`).

Cost per map, all float64 (float32 moved scores by up to 1e-6 on the shipped
registry and by 1e-2 on a synthetic target): a product with the target's triangular
factor and its Gram matrix (numpy's BLAS), a Householder tridiagonalisation with the
target's few columns carried through, and the tridiagonal's eigenvalues (LAPACK
dsytrd, dormtr, dsterf). No eigenvectors: each fixed-point round solves one shifted
tridiagonal system per target column instead
(:func:`~stepstone.selection.logme_evidence.logme_from_tridiagonal`). The maps are
split between threads, and every step releases the GIL
(:mod:`~stepstone.selection.nogil_lapack`). Maps whose (d_out, d_out) side is the
smaller one, targets with many columns, and singular maps where the noise-free limit
is possible take the eigenvectors of the tridiagonal form instead (dstevd).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np

from stepstone.selection.logme import TargetBasis
from stepstone.selection.logme_evidence import logme_from_spectrum, logme_from_tridiagonal
from stepstone.selection.nogil_lapack import (
    eigh_tridiagonal,
    eigvals_tridiagonal,
    tridiagonalize,
)
from stepstone.selection.threads import (
    THREADS_ENV,
    check_n_jobs,
    default_n_jobs,
    map_chunks,
    single_threaded_blas,
)

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)

# Most target columns (classes) for which the tridiagonal route beats eigenvectors:
# measured on 48 synthetic maps, n = 2,000, two threads, ms per map (tridiagonal vs
# eigenvectors): k = 2: 9.6 vs 11.0; 8: 8.5 vs 13.0; 32: 10.4 vs 12.1; 77: 18.6 vs
# 15.7; 150: 27.3 vs 21.7 (one solve per column and round against one eigenproblem).
_TRIDIAGONAL_MAX_K = 32

__all__ = ["THREADS_ENV", "default_n_jobs", "evidence_linear_maps", "logme_linear_maps"]


def _check_maps(
    basis: TargetBasis, weights: np.ndarray, biases: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    W = np.asarray(weights)
    if W.ndim != 3 or W.shape[2] != basis.d or W.shape[1] < 1:
        raise ValueError(f"'weights' must be (B, d_out, {basis.d}); got shape {W.shape}.")
    W = W.astype(np.float64, copy=False)
    if biases is None:
        b = np.zeros(W.shape[:2])
    else:
        b = np.asarray(biases, dtype=np.float64)
        if b.shape != W.shape[:2]:
            raise ValueError(f"'biases' must be (B, d_out) = {W.shape[:2]}; got shape {b.shape}.")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
        raise ValueError("'weights' and 'biases' must be finite; got NaN or inf.")
    return W, b


def _map_products(basis: TargetBasis, W: np.ndarray, b: np.ndarray) -> Iterator[np.ndarray]:
    """``N = M^T = Wt R^T`` (d_out, r) per map, in the target's triangular basis
    (:attr:`TargetBasis.triangular`), one map at a time: numpy's BLAS (GIL released),
    and the memory is a few (d_out, r) matrices whatever the batch."""
    R, _ = basis.triangular
    r = R.shape[0]
    wt = np.empty((W.shape[1], basis.d + 1))
    # R is upper triangular (trapezoidal if r < d + 1), so row block [lo, hi) of
    # N^T = R Wt^T only takes columns lo: of R: two halvings skip ~30% of the flops
    # (and ~35% of the time, measured), and leave out only products with exact zeros.
    cuts = [0, r // 2, r // 2 + (r - r // 2) // 2, r]
    for j in range(W.shape[0]):
        wt[:, :-1], wt[:, -1] = W[j], b[j]
        NT = np.empty((r, W.shape[1]))
        for lo, hi in itertools.pairwise(cuts):
            np.matmul(R[lo:hi, lo:], wt.T[lo:], out=NT[lo:hi])
        yield NT.T


def _cut(s: np.ndarray, r: int, d_out: int) -> np.ndarray:
    """Eigenvalues within round-off of zero (relative to the largest) set to 0."""
    cut = np.maximum(s[:, -1:], 0.0) * max(r, d_out) * _EPS
    return np.where(s > cut, s, 0.0)


def _maps_spectrum(
    basis: TargetBasis, W: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectrum of ``Z = X1 [W, b]^T`` for a batch of maps: (B, m), (B, m, k), (B, k).

    ``m = min(r, d_out)``. Per map (:func:`_map_products`), the eigenvalues of the
    smaller of ``N^T N`` (r, r) and ``N N^T`` (d_out, d_out) and the target's
    coordinates in its eigenvectors (:func:`_gram_spectrum`) give both the spectrum
    and ``U_Z^T y``.
    """
    _, coords = basis.triangular
    n_maps, d_out = W.shape[:2]
    r, k = basis.rank, basis.n_targets
    m = min(r, d_out)
    s = np.empty((n_maps, m))
    proj = np.empty((n_maps, m, k))
    small_side = r <= d_out
    for j, N in enumerate(_map_products(basis, W, b)):
        if small_side:
            # M M^T = N^T N = P S P^T (r, r); U_Z^T y = P^T (Ux^T y).
            s[j], proj[j] = _gram_spectrum(N.T @ N, coords)
        else:
            # M^T M = N N^T = E S E^T (d_out, d_out); E^T (M^T c) = E^T (N c), scaled below.
            s[j], proj[j] = _gram_spectrum(N @ N.T, N @ coords)
    s = _cut(s, r, d_out)
    if small_side:
        # P spans all of R^r, so ||P^T c|| = ||c||; zero eigenvalues keep their share of
        # y, which the evidence treats as residual.
        resid2 = np.broadcast_to(basis.resid2, (n_maps, k)).copy()
        return s, proj, resid2
    keep = s > 0
    # P = M E S^-1/2, so P^T c = S^-1/2 E^T (M^T c) on the kept directions; the dropped
    # ones go to the residual.
    proj = np.where(keep[:, :, None], proj / np.sqrt(np.where(keep, s, 1.0))[:, :, None], 0.0)
    # ||c||^2 - ||P^T c||^2 cancels to within eps ||c||^2; fine unless y is fitted almost
    # exactly by d_out < r directions, where only the (r, r) side would be more precise.
    c_sq = np.einsum("ij,ij->j", coords, coords)
    inside = np.maximum(c_sq[None, :] - np.einsum("brk,brk->bk", proj, proj), 0.0)
    return s, proj, basis.resid2[None, :] + inside


def _gram_spectrum(gram: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (m,), ascending, and ``E^T x`` (m, k) of a symmetric ``gram`` (m, m).

    ``E`` are the eigenvectors. Householder tridiagonalisation ``gram = Q T Q^T`` with
    ``Q^T x`` (:func:`~stepstone.selection.nogil_lapack.tridiagonalize`), then
    ``T = Z L Z^T`` by divide and conquer and ``E^T x = Z^T (Q^T x)``.
    ``np.linalg.eigh`` would also back-transform all ``m`` eigenvectors (``Q Z``), an
    O(m^3) step LogME does not need.
    """
    diag, off, qx = tridiagonalize(gram, x)
    w, Z = eigh_tridiagonal(diag, off)
    return w, Z.T @ qx


def _maps_tridiagonal(
    basis: TargetBasis, W: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tridiagonal form of ``M M^T = N^T N`` (r, r) for a batch of maps
    (:func:`_map_products`): eigenvalues (B, r) (round-off set to 0), diagonal (B, r),
    off-diagonal (B, r - 1) and ``Q^T (Ux^T y)`` (B, r, k).

    No eigenvectors: :func:`~stepstone.selection.logme_evidence.logme_from_tridiagonal`
    needs none, which saves about half of a map's LAPACK time.
    """
    _, coords = basis.triangular
    n_maps, d_out = W.shape[:2]
    r, k = basis.rank, basis.n_targets
    s = np.empty((n_maps, r))
    diag = np.empty((n_maps, r))
    off = np.empty((n_maps, r - 1))
    c = np.empty((n_maps, r, k))
    for j, N in enumerate(_map_products(basis, W, b)):
        diag[j], off[j], c[j] = tridiagonalize(N.T @ N, coords)
        s[j] = eigvals_tridiagonal(diag[j], off[j])
    return _cut(s, r, d_out), diag, off, c


def evidence_linear_maps(
    basis: TargetBasis,
    weights: np.ndarray,
    biases: np.ndarray | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    batch_size: int = 16,
    n_jobs: int | None = None,
) -> np.ndarray:
    """LogME evidence of every target column after each affine map ``z = W x + b``.

    ESM-LogME with LogME of You et al. ICML 2021, from the target's shared
    decomposition: per map only a (d_out, r) product, its Gram matrix, a
    tridiagonalisation and the tridiagonal's eigenvalues, then one tridiagonal
    solve per column and fixed-point round (see the module docstring for the cases
    that take eigenvectors instead); ``Z`` (n, d_out) is never formed.
    Exact (up to round-off, float64 throughout) when ``basis.rank`` is its full
    rank, for every ``n, d``.

    Parameters
    ----------
    basis : TargetBasis
        Decomposition of the target embeddings ``X`` (n, d) and labels.
    weights : ndarray, shape (B, d_out, d)
    biases : ndarray, shape (B, d_out), optional
        Zero when omitted.
    tol, max_iter
        See :func:`logme_fixed_point`.
    batch_size : int
        Most maps whose evidence is solved together per thread (the tridiagonal
        forms or spectra of a batch, about ``batch_size * k * min(r, d_out)``
        float64 values times a few, plus a few (d_out, r) matrices per thread).
    n_jobs : int or None
        Threads splitting the maps, each running one map at a time with
        single-threaded BLAS (process wide, via threadpoolctl, for the duration of
        the call), because per-map parallelism scales better than multi-threaded
        BLAS at this size. None: :func:`default_n_jobs` (``$STEPSTONE_THREADS``,
        else every available CPU). Results do not depend on it.

    Returns
    -------
    ndarray, shape (B, k)
    """
    if not isinstance(basis, TargetBasis):
        raise TypeError(f"'basis' must be a TargetBasis; got {type(basis).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"'batch_size' must be a positive integer; got {batch_size!r}.")
    jobs = check_n_jobs(n_jobs)
    W, b = _check_maps(basis, weights, biases)
    n_maps, d_out = W.shape[0], W.shape[1]
    if n_maps == 0:
        return np.empty((0, basis.n_targets))
    # The tridiagonal route (no eigenvectors) works on the (r, r) side; with r > d_out + 1
    # the (d_out, d_out) side of the spectrum route is smaller. Its per-round solves
    # run over batch_size * k rows at once; many columns make them cost more than the
    # eigenvectors they save.
    tridiagonal = basis.rank <= d_out + 1 and basis.n_targets <= _TRIDIAGONAL_MAX_K
    # Even chunks, so that every thread gets about the same number of maps.
    chunk = max(1, min(batch_size, -(-n_maps // jobs)))

    def spectrum_route(Ws: np.ndarray, bs: np.ndarray) -> np.ndarray:
        s, proj, resid2 = _maps_spectrum(basis, Ws, bs)
        return logme_from_spectrum(s, proj, resid2, n=basis.n, d=d_out, tol=tol,
                                   max_iter=max_iter)

    def score(sl: slice) -> np.ndarray:
        if not tridiagonal:
            return spectrum_route(W[sl], b[sl])
        s, diag, off, c = _maps_tridiagonal(basis, W[sl], b[sl])
        # The noise-free limit (r = n) needs U_Z^T y on a singular spectrum's null space.
        eigen = np.flatnonzero(np.any(s <= 0, axis=1)) if basis.rank == basis.n else []
        tri = np.setdiff1d(np.arange(s.shape[0]), eigen)
        ev = np.empty((s.shape[0], basis.n_targets))
        try:
            ev[tri] = logme_from_tridiagonal(
                s[tri], diag[tri], off[tri], c[tri],
                np.broadcast_to(basis.resid2, (tri.size, basis.n_targets)), n=basis.n,
                tol=tol, max_iter=max_iter)
        except np.linalg.LinAlgError:
            eigen = np.arange(s.shape[0])
        if len(eigen):
            ev[eigen] = spectrum_route(W[sl][eigen], b[sl][eigen])
        return ev

    with single_threaded_blas():
        _ = basis.triangular  # computed once here, not raced for by the threads
        return np.concatenate(map_chunks(score, n_maps, chunk, jobs), axis=0)


def logme_linear_maps(
    basis: TargetBasis,
    weights: np.ndarray,
    biases: np.ndarray | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    batch_size: int = 16,
    n_jobs: int | None = None,
) -> np.ndarray:
    """LogME score (mean evidence over target columns) after each affine map.

    ESM-LogME: ``LogME(X W_j^T + b_j, y)`` (You et al. ICML 2021) for ``j < B``
    without materialising the mapped embeddings; see :func:`evidence_linear_maps`.

    Parameters
    ----------
    basis : TargetBasis
    weights : ndarray, shape (B, d_out, d)
    biases : ndarray, shape (B, d_out), optional
    tol, max_iter, batch_size, n_jobs
        See :func:`evidence_linear_maps`.

    Returns
    -------
    ndarray, shape (B,)
    """
    return evidence_linear_maps(basis, weights, biases, tol=tol, max_iter=max_iter,
                                batch_size=batch_size, n_jobs=n_jobs).mean(axis=1)
