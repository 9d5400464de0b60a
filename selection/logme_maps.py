"""ESM-LogME's fast path: LogME after many affine maps of one target's embeddings.

For affine maps ``z = W x + b`` (linear and low-rank ESMs, Schulte et al. 2024) of
shared target embeddings ``X``, the LogME spectrum (You et al. ICML 2021) of
``Z = [X, 1] [W, b]^T`` follows from the target's decomposition
(:class:`~stepstone.selection.logme.TargetBasis`) and one small eigendecomposition per
map, so ``Z`` is never formed; the evidence then comes from the same core as every
other LogME entry point (:func:`~stepstone.selection.logme_evidence.logme_from_spectrum`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from stepstone.selection.logme import TargetBasis
from stepstone.selection.logme_evidence import logme_from_spectrum

_EPS = float(np.finfo(np.float64).eps)

__all__ = ["evidence_linear_maps", "logme_linear_maps"]


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


def _maps_spectrum(
    basis: TargetBasis, W: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectrum of ``Z = X1 [W, b]^T`` for a batch of maps: (B, m), (B, m, k), (B, k).

    ``m = min(r, d_out)``: with ``N = M^T = Wt (Sx Vx^T)^T`` (B, d_out, r), the
    eigendecomposition of the smaller of ``N^T N`` (r, r) and ``N N^T`` (d_out, d_out),
    which dominates the cost, gives both the spectrum and ``U_Z^T y``.
    """
    Wt = np.concatenate([W, b[:, :, None]], axis=2)  # (B, d_out, d + 1)
    d_out, r = Wt.shape[1], basis.rank
    N = Wt @ basis.loadings.T  # (B, d_out, r)
    Nt = np.swapaxes(N, 1, 2)
    if r <= d_out:
        # numpy runs X^T X of one buffer as a rank-k update (syrk): half a matmul.
        s, P = np.linalg.eigh(Nt @ N)  # M M^T = P S P^T, (B, r, r)
        proj = np.swapaxes(P, 1, 2) @ basis.coords  # P^T (Ux^T y), (B, r, k)
        cut = np.maximum(s[:, -1:], 0.0) * max(r, d_out) * _EPS
        s = np.where(s > cut, s, 0.0)
        # P spans all of R^r, so ||P^T c|| = ||c||; zero eigenvalues keep their share of
        # y, which the evidence treats as residual.
        resid2 = np.broadcast_to(basis.resid2, (W.shape[0], basis.n_targets)).copy()
        return s, proj, resid2
    s, R = np.linalg.eigh(N @ Nt)  # M^T M = R S R^T, (B, d_out, d_out)
    cut = np.maximum(s[:, -1:], 0.0) * max(r, d_out) * _EPS
    keep = s > cut
    s = np.where(keep, s, 0.0)
    # P = M R S^-1/2, so P^T c = S^-1/2 R^T (M^T c) on the kept directions; the dropped
    # ones go to the residual.
    proj = np.swapaxes(R, 1, 2) @ (N @ basis.coords)  # (B, d_out, k)
    proj = np.where(keep[:, :, None], proj / np.sqrt(np.where(keep, s, 1.0))[:, :, None], 0.0)
    # ||c||^2 - ||P^T c||^2 cancels to within eps ||c||^2; fine unless y is fitted almost
    # exactly by d_out < r directions, where only the (r, r) side would be more precise.
    c_sq = np.einsum("ij,ij->j", basis.coords, basis.coords)
    inside = np.maximum(c_sq[None, :] - np.einsum("brk,brk->bk", proj, proj), 0.0)
    return s, proj, basis.resid2[None, :] + inside


def _available_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


@contextmanager
def _single_threaded_blas() -> Iterator[bool]:
    """Limit BLAS to one thread while our own threads split the maps.

    Yields False when threadpoolctl is missing: the caller then stays serial, since
    threads on top of a multi-threaded BLAS oversubscribe the cores (OpenBLAS's
    spin-waiting makes that far slower than serial).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield True


def _map_chunks(
    fn: Callable[[slice], np.ndarray], n_items: int, chunk: int, n_jobs: int
) -> list[np.ndarray]:
    slices = [slice(i, min(i + chunk, n_items)) for i in range(0, n_items, chunk)]
    if n_jobs <= 1 or len(slices) <= 1:
        return [fn(sl) for sl in slices]
    with _single_threaded_blas() as limited:
        if not limited:
            return [fn(sl) for sl in slices]
        # numpy's eigh and matmul release the GIL, so the maps really run in parallel.
        with ThreadPoolExecutor(max_workers=min(n_jobs, len(slices))) as pool:
            return list(pool.map(fn, slices))


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
    decomposition: per map only an (r, d_out) product and one eigendecomposition
    of size ``min(r, d_out)``; ``Z`` (n, d_out) is never formed. Exact (up to
    round-off) when ``basis.rank`` is its full rank, for every ``n, d``.

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
        Most maps processed together per thread; memory is about
        ``5 * batch_size * r * d_out`` float64 values per thread.
    n_jobs : int or None
        Threads splitting the maps; None uses every available CPU. With more than
        one, BLAS is limited to one thread for the duration of the call (process
        wide, via threadpoolctl), because per-map parallelism scales better than a
        multi-threaded eigendecomposition of this size.

    Returns
    -------
    ndarray, shape (B, k)
    """
    if not isinstance(basis, TargetBasis):
        raise TypeError(f"'basis' must be a TargetBasis; got {type(basis).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"'batch_size' must be a positive integer; got {batch_size!r}.")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int)
                               or n_jobs < 1):
        raise ValueError(f"'n_jobs' must be None or a positive integer; got {n_jobs!r}.")
    W, b = _check_maps(basis, weights, biases)
    n_maps, d_out = W.shape[0], W.shape[1]
    jobs = _available_cpus() if n_jobs is None else n_jobs
    # Even chunks, so that every thread gets about the same number of maps.
    chunk = max(1, min(batch_size, -(-n_maps // max(jobs, 1))))

    def score(sl: slice) -> np.ndarray:
        s, proj, resid2 = _maps_spectrum(basis, W[sl], b[sl])
        return logme_from_spectrum(s, proj, resid2, n=basis.n, d=d_out, tol=tol,
                                   max_iter=max_iter)

    if n_maps == 0:
        return np.empty((0, basis.n_targets))
    return np.concatenate(_map_chunks(score, n_maps, chunk, jobs), axis=0)


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
