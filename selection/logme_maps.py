"""ESM-LogME's fast path: LogME after many affine maps of one target's embeddings.

For affine maps ``z = W x + b`` (linear and low-rank ESMs, Schulte et al. 2024) of
shared target embeddings ``X``, the LogME spectrum (You et al. ICML 2021) of
``Z = [X, 1] [W, b]^T`` follows from the target's decomposition
(:class:`~stepstone.selection.logme.TargetBasis`) and one small symmetric eigenproblem
per map, so ``Z`` is never formed; the evidence then comes from the same core as every
other LogME entry point (:func:`~stepstone.selection.logme_evidence.logme_from_spectrum`).

Cost per map, all float64 (float32 moved scores by up to 1e-6 on the shipped
registry and by 1e-2 on a synthetic target): a triangular multiply and a symmetric
product (BLAS trmm, syrk), a tridiagonalisation and a divide-and-conquer tridiagonal
eigensolver (LAPACK dsytrd, dstevd), with the target's few columns carried through
instead of the eigenvectors; the maps are split between threads.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from stepstone.selection.logme import TargetBasis
from stepstone.selection.logme_evidence import logme_from_spectrum

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)

# Environment variable with the default thread count (see default_n_jobs).
THREADS_ENV = "STEPSTONE_THREADS"

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


def _maps_spectrum(
    basis: TargetBasis, W: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectrum of ``Z = X1 [W, b]^T`` for a batch of maps: (B, m), (B, m, k), (B, k).

    ``m = min(r, d_out)``. Per map, with ``N = M^T = Wt R^T`` (d_out, r) in the
    target's triangular basis (:attr:`TargetBasis.triangular`: a triangular multiply
    when ``R`` is square), the eigenvalues of the smaller of ``N^T N`` (r, r) and
    ``N N^T`` (d_out, d_out) and the target's coordinates in its eigenvectors
    (:func:`_gram_spectrum`) give both the spectrum and ``U_Z^T y``. One map at a
    time: every step is a BLAS or LAPACK call per map anyway, and so the memory is a
    few (d_out, r) matrices whatever the batch.
    """
    blas, _ = _lapack()
    R, coords = basis.triangular
    n_maps, d_out = W.shape[:2]
    r, k = basis.rank, basis.n_targets
    m = min(r, d_out)
    s = np.empty((n_maps, m))
    proj = np.empty((n_maps, m, k))
    small_side = r <= d_out
    square = R.shape[0] == R.shape[1]
    # N c = Wt (R^T c): the (d + 1, k) half once, so no map needs a product with N.
    rc = R.T @ coords
    wt = np.empty((d_out, basis.d + 1), order="F")
    for j in range(n_maps):
        wt[:, :-1], wt[:, -1] = W[j], b[j]
        # Fortran (d_out, r): N.T is the C-ordered (r, d_out) that dsyrk takes as is.
        N = (blas.dtrmm(1.0, R, wt, side=1, lower=0, trans_a=1) if square
             else np.asfortranarray(wt @ R.T))
        if small_side:
            # M M^T = N^T N = P S P^T (r, r); U_Z^T y = P^T (Ux^T y).
            gram = blas.dsyrk(1.0, N, trans=1, lower=1)
            s[j], proj[j] = _gram_spectrum(gram, coords)
        else:
            # M^T M = N N^T = E S E^T (d_out, d_out); E^T (M^T c) = E^T (N c), scaled below.
            gram = blas.dsyrk(1.0, N, trans=0, lower=1)
            s[j], proj[j] = _gram_spectrum(gram, wt @ rc)
    cut = np.maximum(s[:, -1:], 0.0) * max(r, d_out) * _EPS
    if small_side:
        s = np.where(s > cut, s, 0.0)
        # P spans all of R^r, so ||P^T c|| = ||c||; zero eigenvalues keep their share of
        # y, which the evidence treats as residual.
        resid2 = np.broadcast_to(basis.resid2, (n_maps, k)).copy()
        return s, proj, resid2
    keep = s > cut
    s = np.where(keep, s, 0.0)
    # P = M E S^-1/2, so P^T c = S^-1/2 E^T (M^T c) on the kept directions; the dropped
    # ones go to the residual.
    proj = np.where(keep[:, :, None], proj / np.sqrt(np.where(keep, s, 1.0))[:, :, None], 0.0)
    # ||c||^2 - ||P^T c||^2 cancels to within eps ||c||^2; fine unless y is fitted almost
    # exactly by d_out < r directions, where only the (r, r) side would be more precise.
    c_sq = np.einsum("ij,ij->j", coords, coords)
    inside = np.maximum(c_sq[None, :] - np.einsum("brk,brk->bk", proj, proj), 0.0)
    return s, proj, basis.resid2[None, :] + inside


def _lapack() -> tuple[Any, Any]:
    # scipy comes with scikit-learn; imported on first use, not with this module.
    from scipy.linalg import blas, lapack

    return blas, lapack


@functools.cache
def _dsytrd_lwork(m: int) -> int:
    _, lapack = _lapack()
    work, info = lapack.dsytrd_lwork(m, lower=1)
    _check_info(info, "dsytrd_lwork")
    return int(work)


def _check_info(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed with info = {info}.")


def _gram_spectrum(gram: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (m,), ascending, and ``E^T x`` (m, k) of a symmetric ``gram`` (m, m).

    ``E`` are the eigenvectors; only the lower triangle of ``gram`` is read (and
    overwritten when it is Fortran-ordered, as dsyrk returns it). Householder
    tridiagonalisation ``gram = Q T Q^T`` (LAPACK dsytrd), ``T = Z L Z^T`` by divide
    and conquer (dstevd), and ``E^T x = Z^T (Q^T x)`` with ``Q`` applied to the ``k``
    columns of ``x`` only (dormqr on dsytrd's reflectors, as dormtr does).
    ``np.linalg.eigh`` would also back-transform all ``m`` eigenvectors (``Q Z``), an
    O(m^3) step LogME does not need: this route takes about half its time.
    """
    m = gram.shape[0]
    if m == 1:
        return np.array([gram[0, 0]]), np.array(x, dtype=np.float64)
    _, lapack = _lapack()
    c, diag, off, tau, info = lapack.dsytrd(gram, lower=1, lwork=_dsytrd_lwork(m),
                                            overwrite_a=1)
    _check_info(info, "dsytrd")
    # dsytrd (lower) keeps reflector i below the subdiagonal of column i: the layout
    # dgeqrf leaves, in c[1:, :-1], acting on rows 1: (row 0 is left alone).
    qx = np.array(x, dtype=np.float64, order="F")
    qx[1:], _, info = lapack.dormqr("L", "T", c[1:, :-1], tau, qx[1:],
                                    lwork=max(1, qx.shape[1]) * 64)
    _check_info(info, "dormqr")
    w, Z = _dstevd(diag, off)
    return w, Z.T @ qx


def _dstevd(diag: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric tridiagonal (LAPACK dstevd).

    Called through ctypes, which releases the GIL, as scipy's own wrapper of the
    tridiagonal solvers does not: with it, the threads of :func:`_map_chunks` would
    queue on the GIL for a third of every map's time.
    """
    m = diag.size
    w = np.array(diag, dtype=np.float64)
    e = np.array(off, dtype=np.float64)
    Z = np.empty((m, m), order="F")
    lwork, liwork = 1 + 4 * m + m * m, 3 + 5 * m
    work = np.empty(lwork)
    iwork = np.empty(liwork, dtype=np.intc)
    c_int, d_ptr = ctypes.c_int, ctypes.POINTER(ctypes.c_double)
    info = c_int(0)
    _dstevd_ptr()(b"V", ctypes.byref(c_int(m)), w.ctypes.data_as(d_ptr), e.ctypes.data_as(d_ptr),
                  Z.ctypes.data_as(d_ptr), ctypes.byref(c_int(m)), work.ctypes.data_as(d_ptr),
                  ctypes.byref(c_int(lwork)), iwork.ctypes.data_as(ctypes.POINTER(c_int)),
                  ctypes.byref(c_int(liwork)), ctypes.byref(info))
    _check_info(info.value, "dstevd")
    return w, Z


@functools.cache
def _dstevd_ptr() -> Any:
    """scipy's dstevd (scipy.linalg.cython_lapack, its public C-level LAPACK) as a
    ctypes function."""
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__["dstevd"]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    i, d = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
    # jobz, n, d, e, z, ldz, work, lwork, iwork, liwork, info
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p, i, d, d, d, i, d, i, i, i, i)
    return proto(address)


def _available_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def default_n_jobs() -> int:
    """Threads ESM-LogME uses when ``n_jobs`` is None: ``$STEPSTONE_THREADS`` if set,
    else every CPU this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return _available_cpus()
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ValueError(f"${THREADS_ENV} must be a positive integer; got {value!r}.")
    return jobs


def _check_n_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        return default_n_jobs()
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs < 1:
        raise ValueError(f"'n_jobs' must be None or a positive integer; got {n_jobs!r}.")
    return int(n_jobs)


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS (numpy's and scipy's) limited to one thread, process wide, meanwhile.

    One map's matrices are too small for BLAS threads to pay, and BLAS threads on top
    of ours (or of a busy machine) oversubscribe the cores: OpenBLAS's spin-waiting
    then makes a map tens of times slower.
    """
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    _lapack()  # scipy's own BLAS must be loaded before the limit, or it is not limited
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _map_chunks(
    fn: Callable[[slice], np.ndarray], n_items: int, chunk: int, n_jobs: int
) -> list[np.ndarray]:
    """``fn`` over consecutive slices of ``chunk`` items, on ``n_jobs`` threads."""
    slices = [slice(i, min(i + chunk, n_items)) for i in range(0, n_items, chunk)]
    if n_jobs <= 1 or len(slices) <= 1:
        return [fn(sl) for sl in slices]
    # BLAS and LAPACK release the GIL, so the maps really run in parallel.
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
    decomposition: per map only a (d_out, r) product, its Gram matrix and one
    symmetric eigenproblem of size ``min(r, d_out)`` (eigenvalues and the target's
    ``k`` coordinates, not the eigenvectors); ``Z`` (n, d_out) is never formed.
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
        Most maps whose evidence is solved together per thread (the spectra of a
        batch, about ``batch_size * k * min(r, d_out)`` float64 values, plus a few
        (d_out, r) matrices per thread).
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
    jobs = _check_n_jobs(n_jobs)
    W, b = _check_maps(basis, weights, biases)
    n_maps, d_out = W.shape[0], W.shape[1]
    if n_maps == 0:
        return np.empty((0, basis.n_targets))
    # Even chunks, so that every thread gets about the same number of maps.
    chunk = max(1, min(batch_size, -(-n_maps // jobs)))

    def score(sl: slice) -> np.ndarray:
        s, proj, resid2 = _maps_spectrum(basis, W[sl], b[sl])
        return logme_from_spectrum(s, proj, resid2, n=basis.n, d=d_out, tol=tol,
                                   max_iter=max_iter)

    with _single_threaded_blas():
        _ = basis.triangular  # computed once here, not raced for by the threads
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
