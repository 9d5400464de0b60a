"""The few LAPACK routines ESM-LogME runs per map, called so that they release the GIL.

scipy's f2py wrappers (``scipy.linalg.lapack``) hold the GIL while LAPACK runs, so the
maps that :func:`~stepstone.selection.logme_maps.evidence_linear_maps` splits between
threads would take turns. The same routines from ``scipy.linalg.cython_lapack``
(scipy's public C-level LAPACK, the library numpy and scipy already load) called
through ctypes release it. Measured on the 2-core machine, idle: two threads ran 1.08×
as many dsytrd calls per second as one through scipy's wrapper, 2.0× as many numpy
matrix products.

Arrays are float64 and contiguous; nothing here checks shapes (private callers only).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

__all__ = ["eigh_tridiagonal", "eigvals_tridiagonal", "solve_shifted_tridiagonal",
           "tridiagonalize"]

_c_int = ctypes.c_int

# Argument types per routine (Fortran LAPACK, every argument by reference).
_CH, _I, _D = ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
_V = ctypes.c_void_p  # double* passed as an address (rows of a batch)
_SIGNATURES = {
    # uplo, n, a, lda, d, e, tau, work, lwork, info
    "dsytrd": (_CH, _I, _D, _I, _D, _D, _D, _D, _I, _I),
    # side, uplo, trans, m, n, a, lda, tau, c, ldc, work, lwork, info
    "dormtr": (_CH, _CH, _CH, _I, _I, _D, _I, _D, _D, _I, _D, _I, _I),
    # n, d, e, info
    "dsterf": (_I, _D, _D, _I),
    # jobz, n, d, e, z, ldz, work, lwork, iwork, liwork, info
    "dstevd": (_CH, _I, _D, _D, _D, _I, _D, _I, _I, _I, _I),
    # n, nrhs, d, e, b, ldb, info
    "dptsv": (_I, _I, _V, _V, _V, _I, _I),
}


@functools.cache
def _routine(name: str) -> Any:
    """``scipy.linalg.cython_lapack``'s ``name`` as a ctypes function (GIL released)."""
    # scipy comes with scikit-learn; imported on first use, not with this module.
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *_SIGNATURES[name])(address)


def _p(a: np.ndarray) -> Any:
    return a.ctypes.data_as(_D)


def _ref(value: int) -> Any:
    return ctypes.byref(_c_int(value))


def check_info(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed with info = {info}.")


@functools.cache
def _dsytrd_lwork(m: int) -> int:
    from scipy.linalg import lapack

    work, info = lapack.dsytrd_lwork(m, lower=1)
    check_info(info, "dsytrd_lwork")
    return max(int(work), 1)


def tridiagonalize(gram: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``gram = Q T Q^T``: ``T``'s diagonal (m,), off-diagonal (m - 1,) and ``Q^T x`` (m, k).

    Householder tridiagonalisation (LAPACK dsytrd) of the lower triangle of ``gram``
    in Fortran order (a full symmetric matrix in either order qualifies), which it
    overwrites; ``Q`` is applied to the ``k`` columns of ``x`` only (dormtr).
    """
    m, k = x.shape
    info = _c_int(0)
    diag, off, tau = np.empty(m), np.empty(max(m - 1, 1)), np.empty(max(m - 1, 1))
    lwork = _dsytrd_lwork(m)
    work = np.empty(lwork)
    _routine("dsytrd")(b"L", _ref(m), _p(gram), _ref(m), _p(diag), _p(off), _p(tau), _p(work),
                       _ref(lwork), ctypes.byref(info))
    check_info(info.value, "dsytrd")
    qx = np.array(x, dtype=np.float64, order="F")
    if k:
        # The minimal workspace makes dormtr apply the reflectors one by one (O(m^2 k)):
        # its blocked path first builds a triangular factor per 32 reflectors, which for
        # few columns costs 4x more (0.49 vs 0.12 ms at m = 385, k = 2, measured).
        _routine("dormtr")(b"L", b"L", b"T", _ref(m), _ref(k), _p(gram), _ref(m), _p(tau), _p(qx),
                           _ref(m), _p(work), _ref(k), ctypes.byref(info))
        check_info(info.value, "dormtr")
    return diag, off[:m - 1], qx


def eigvals_tridiagonal(diag: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of the symmetric tridiagonal ``(diag, off)`` (dsterf)."""
    m = diag.size
    w, e = np.array(diag, dtype=np.float64), np.append(np.asarray(off, dtype=np.float64), 0.0)
    info = _c_int(0)
    _routine("dsterf")(_ref(m), _p(w), _p(e), ctypes.byref(info))
    check_info(info.value, "dsterf")
    return w


def eigh_tridiagonal(diag: np.ndarray, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (m, m) of a symmetric tridiagonal
    (divide and conquer, dstevd)."""
    m = diag.size
    w = np.array(diag, dtype=np.float64)
    e = np.append(np.asarray(off, dtype=np.float64), 0.0)
    Z = np.empty((m, m), order="F")
    lwork, liwork = 1 + 4 * m + m * m, 3 + 5 * m
    work = np.empty(lwork)
    iwork = np.empty(liwork, dtype=np.intc)
    info = _c_int(0)
    _routine("dstevd")(b"V", _ref(m), _p(w), _p(e), _p(Z), _ref(m), _p(work), _ref(lwork),
                       iwork.ctypes.data_as(_I), _ref(liwork), ctypes.byref(info))
    check_info(info.value, "dstevd")
    return w, Z


def solve_shifted_tridiagonal(
    diag: np.ndarray, off: np.ndarray, shift: np.ndarray, rhs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(T_i + shift_i I) w_i = rhs_i`` for every row ``i`` of a batch (dptsv, LDL^T).

    ``diag`` and ``rhs`` (N, m), ``off`` (N, m - 1), ``shift`` (N,). Returns ``w``
    (N, m) and whether each system was positive definite (False: that row of ``w`` is
    not a solution).
    """
    rows, m = rhs.shape
    d = np.ascontiguousarray(diag + shift[:, None])
    e = np.array(off, dtype=np.float64, order="C")
    w = np.array(rhs, dtype=np.float64, order="C")
    ok = np.ones(rows, dtype=bool)
    if m == 0:
        return w, ok
    solve, n_ref, one, info = _routine("dptsv"), _ref(m), _ref(1), _c_int(0)
    info_ref = ctypes.byref(info)
    d0, e0, w0 = d.ctypes.data, e.ctypes.data, w.ctypes.data
    step, step_e = 8 * m, 8 * (m - 1)
    for i in range(rows):
        solve(n_ref, one, d0 + i * step, e0 + i * step_e, w0 + i * step, n_ref, info_ref)
        if info.value:
            ok[i] = False
            info.value = 0
    return w, ok
