"""LogME: the log marginal evidence of a linear model on fixed features.

LogME (You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models
for Transfer Learning", ICML 2021) scores features ``F`` (n, d) for targets ``y``
(n,) by the evidence of Bayesian linear regression ``y = F m + noise`` with prior
``m ~ N(0, alpha^-1 I_d)`` and noise ``N(0, beta^-1 I_n)``, maximised over
``alpha, beta`` by MacKay's fixed point, divided by ``n`` and averaged over
target columns (one-hot columns for classification). Where the maximum lies on
the boundary (``alpha -> inf``: the features explain nothing about a column; or,
for ``n <= d``, ``beta -> inf``: a noise-free fit), the closed-form limit is used
instead of stopping the iteration part-way there.

Everything here works from the spectrum of ``F``: ``sigma2`` (squared singular
values), ``proj = U^T y`` and the part of ``||y||^2`` outside ``span(U)``. That
makes the evidence exact for every shape, ``n < d`` included, where the
reference implementation (thuml/LogME, copied by hf-dataset-selector) drops the
``(d - r) log alpha`` part of ``log|alpha I + beta F^T F|`` (thuml/LogME issue
#23). It also gives ESM-LogME its fast path: for affine maps ``z = W x + b`` of
shared target embeddings ``X``, the spectrum of ``Z = [X, 1] [W, b]^T`` follows
from a small matrix built from the target's decomposition (``TargetBasis``,
``logme_linear_maps``), so ``Z`` is never materialised.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Literal, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

LabelKind = Literal["classification", "regression"]
LABEL_KINDS: tuple[str, ...] = ("classification", "regression")

# Denominator floor in the fixed point: keeps alpha (or beta) finite, if huge, when y
# is orthogonal to the features (or fitted exactly), where the optimum is at infinity.
_TINY = 1e-300
_EPS = float(np.finfo(np.float64).eps)
# Relative size below which a residual share of ||y||^2 is round-off of the projection.
_ROUNDOFF = 1e-10
_LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "LABEL_KINDS",
    "LabelKind",
    "LogME",
    "LogMEFit",
    "TargetBasis",
    "evidence_linear_maps",
    "feature_spectrum",
    "log_evidence",
    "logme_fixed_point",
    "logme_from_spectrum",
    "logme_linear_maps",
    "logme_score",
]


class LogMEFit(NamedTuple):
    """Result of :func:`logme_fixed_point`; every field has the shape (..., k)."""

    evidence: np.ndarray
    """Log marginal likelihood per sample at the returned ``alpha, beta``."""
    alpha: np.ndarray
    """Prior precision; ``inf`` where the maximum is the ``alpha -> inf`` limit."""
    beta: np.ndarray
    """Noise precision; ``inf`` where the maximum is the noise-free limit."""
    n_iter: np.ndarray
    """Fixed-point iterations run per column."""
    converged: np.ndarray
    """Whether ``alpha / beta`` changed by at most ``tol`` (relative), or a boundary
    limit was taken."""


# --------------------------------------------------------------------------- spectrum core
def _check_spectrum(
    sigma2: np.ndarray, proj: np.ndarray, resid2: np.ndarray, n: int, d: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    proj = np.asarray(proj, dtype=np.float64)
    resid2 = np.asarray(resid2, dtype=np.float64)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"'n' must be a positive integer; got {n!r}.")
    if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
        raise ValueError(f"'d' must be a positive integer; got {d!r}.")
    if sigma2.ndim < 1 or proj.ndim != sigma2.ndim + 1 or resid2.ndim != sigma2.ndim:
        raise ValueError(
            "Expected sigma2 (..., r), proj (..., r, k) and resid2 (..., k); got shapes "
            f"{sigma2.shape}, {proj.shape} and {resid2.shape}."
        )
    batch, r = sigma2.shape[:-1], sigma2.shape[-1]
    k = proj.shape[-1]
    if proj.shape != (*batch, r, k) or resid2.shape != (*batch, k):
        raise ValueError(
            "Expected sigma2 (..., r), proj (..., r, k) and resid2 (..., k) with matching "
            f"leading axes; got shapes {sigma2.shape}, {proj.shape} and {resid2.shape}."
        )
    if r > min(n, d):
        raise ValueError(
            f"The spectrum of an (n, d) = ({n}, {d}) matrix has at most min(n, d) = "
            f"{min(n, d)} entries; got r = {r}."
        )
    for name, arr in (("sigma2", sigma2), ("proj", proj), ("resid2", resid2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"'{name}' must be finite; got NaN or inf.")
    if sigma2.size:
        # Gram eigenvalues come with round-off of either sign; only clearly negative
        # values mean the caller passed something that is not a spectrum.
        scale = np.max(np.abs(sigma2), axis=-1, keepdims=True)
        if np.any(sigma2 < -1e-8 * scale):
            raise ValueError("'sigma2' must be non-negative squared singular values.")
        sigma2 = np.maximum(sigma2, 0.0)
    return sigma2, proj, np.maximum(resid2, 0.0)


def _posterior_terms(
    s: np.ndarray, x2: np.ndarray, resid: np.ndarray, t: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows are target columns: s, x2 (N, r); resid, t (N,).

    Returns gamma, n - gamma, ||m||^2, ||y - F m||^2 and sum_i log(1 + s_i / t), all (N,),
    for the posterior mean m at ``t = alpha / beta``.
    """
    denom = s + t[:, None]
    q = t[:, None] / denom  # t / (t + s_i): the share of y_i left in the residual
    gamma = (s / denom).sum(axis=1)
    # n - gamma summed from its positive parts: no cancellation when gamma -> r = n.
    n_minus_gamma = (n - s.shape[1]) + q.sum(axis=1)
    m2 = (s * x2 / (denom * denom)).sum(axis=1)
    res2 = (x2 * q * q).sum(axis=1) + resid
    logdet = np.log1p(s / t[:, None]).sum(axis=1)
    return gamma, n_minus_gamma, m2, res2, logdet


def _evidence_rows(
    s: np.ndarray, x2: np.ndarray, resid: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
    n: int,
) -> np.ndarray:
    """Per-sample evidence for rows of target columns (see :func:`log_evidence`).

    ``alpha = inf`` or ``beta = inf`` give the limits there (see :func:`_boundary`).
    """
    ev = np.empty(s.shape[0])
    a_inf = np.isinf(alpha)
    b_inf = np.isinf(beta) & ~a_inf
    mid = ~(a_inf | b_inf)
    if np.any(mid):
        a, b = alpha[mid], beta[mid]
        _, _, m2, res2, logdet = _posterior_terms(s[mid], x2[mid], resid[mid], a / b, n)
        # Explicitly (You et al. eq. 2, A = alpha I_d + beta F^T F with d eigenvalues):
        #   n/2 log beta + d/2 log alpha - n/2 log 2pi - beta/2 ||y - F m||^2
        #   - alpha/2 ||m||^2 - 1/2 [sum_{i<=r} log(alpha + beta s_i) + (d - r) log alpha].
        # The d/2 log alpha and the d log-alpha parts of log|A| cancel, leaving
        # -1/2 sum_{i<=r} log(1 + s_i / t): d drops out, as it must for the marginal
        # N(y | 0, beta^-1 I + alpha^-1 F F^T). Dropping the (d - r) log alpha term
        # instead is thuml/LogME issue #23 (wrong whenever r < d, e.g. n < d).
        ev[mid] = (0.5 * n * np.log(b) - 0.5 * n * _LOG_2PI - 0.5 * b * res2
                   - 0.5 * a * m2 - 0.5 * logdet) / n
    if np.any(a_inf):
        # alpha -> inf: m = 0, y ~ N(0, beta^-1 I).
        y_sq = x2[a_inf].sum(axis=1) + resid[a_inf]
        b = beta[a_inf]
        ev[a_inf] = 0.5 * np.log(b) - 0.5 * _LOG_2PI - 0.5 * b * y_sq / n
    if np.any(b_inf):
        ev[b_inf] = _noise_free_evidence(s[b_inf], x2[b_inf], resid[b_inf], alpha[b_inf], n)
    return ev


def _noise_free_evidence(
    s: np.ndarray, x2: np.ndarray, resid: np.ndarray, alpha: np.ndarray, n: int
) -> np.ndarray:
    """``log N(y | 0, alpha^-1 F F^T) / n``, the ``beta -> inf`` limit, per row.

    Finite only when ``F F^T`` is nonsingular (``r = n``, every ``s_i > 0``) and so
    ``y`` has no residual; ``-inf`` when ``y`` leaves ``span(F)``; ``+inf`` when ``y``
    lies in a proper subspace of ``R^n`` spanned by ``F`` (the density is unbounded).
    ``resid`` up to ``_ROUNDOFF * ||y||^2`` counts as zero.
    """
    y_sq = x2.sum(axis=1) + resid
    outside = (resid > _ROUNDOFF * y_sq) | np.any((s <= 0) & (x2 > _ROUNDOFF * y_sq[:, None]),
                                                  axis=1)
    singular = (s.shape[1] < n) | np.any(s <= 0, axis=1)
    safe = np.where(s > 0, s, 1.0)
    quad = (x2 / safe * (s > 0)).sum(axis=1)
    logdet = np.log(safe).sum(axis=1)
    ev = -0.5 * (_LOG_2PI + (logdet - n * np.log(alpha) + alpha * quad) / n)
    return np.where(outside, -np.inf, np.where(singular, np.inf, ev))


def _boundary(
    s: np.ndarray, x2: np.ndarray, resid: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best evidence on the finite boundaries of (alpha, beta), per row.

    The fixed point runs off to one when no interior maximum exists: ``alpha -> inf``
    (the features explain nothing; ``beta = n / ||y||^2``) or, when ``F F^T`` is
    nonsingular (``n <= d``), ``beta -> inf`` (noise-free fit; ``alpha = n / y^T
    (F F^T)^-1 y``). Returns ``evidence, alpha, beta`` of the better one.
    """
    y_sq = x2.sum(axis=1) + resid
    beta_inf = n / y_sq
    ev = 0.5 * np.log(beta_inf) - 0.5 * _LOG_2PI - 0.5
    alpha = np.full(s.shape[0], np.inf)
    beta = beta_inf
    if s.shape[1] == n:
        safe = np.where(s > 0, s, 1.0)
        quad = (x2 / safe).sum(axis=1)
        alpha0 = n / np.maximum(quad, _TINY)
        ev0 = _noise_free_evidence(s, x2, resid, alpha0, n)
        better = np.isfinite(ev0) & (ev0 > ev)
        ev = np.where(better, ev0, ev)
        alpha = np.where(better, alpha0, alpha)
        beta = np.where(better, np.inf, beta)
    return ev, alpha, beta


def _rows(
    sigma2: np.ndarray, proj: np.ndarray, resid2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., r), (..., r, k), (..., k) -> one row per (batch, column): (N, r), (N, r), (N,)."""
    r, k = proj.shape[-2], proj.shape[-1]
    batch = math.prod(sigma2.shape[:-1])
    s = np.repeat(sigma2.reshape(batch, r), k, axis=0)
    x2 = np.square(np.swapaxes(proj, -1, -2)).reshape(batch * k, r)
    return s, x2, resid2.reshape(batch * k)


def log_evidence(
    sigma2: np.ndarray,
    proj: np.ndarray,
    resid2: np.ndarray,
    alpha: np.ndarray | float,
    beta: np.ndarray | float,
    *,
    n: int,
    d: int,
) -> np.ndarray:
    """Evidence per sample, ``log p(y | F, alpha, beta) / n``, at given ``alpha, beta``.

    LogME, You et al. ICML 2021, eq. 2, with the log-determinant over all ``d``
    eigenvalues of ``alpha I + beta F^T F`` (``d - r`` of them equal ``alpha``).

    Parameters
    ----------
    sigma2 : ndarray, shape (..., r)
        Squared singular values of ``F`` (n, d); zeros allowed, ``r <= min(n, d)``.
    proj : ndarray, shape (..., r, k)
        ``U^T y`` for ``k`` target columns, ``U`` the matching left singular vectors.
    resid2 : ndarray, shape (..., k)
        ``||y||^2 - ||U^T y||^2``, the part of ``y`` outside ``span(U)``; clipped at 0.
    alpha, beta : float or ndarray broadcastable to (..., k)
        Prior and noise precisions, positive; ``inf`` gives the limit there (as
        returned by :func:`logme_fixed_point` for boundary maxima).
    n, d : int
        Shape of ``F``.

    Returns
    -------
    ndarray, shape (..., k)
    """
    sigma2, proj, resid2 = _check_spectrum(sigma2, proj, resid2, n, d)
    out_shape = resid2.shape
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), out_shape).reshape(-1)
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), out_shape).reshape(-1)
    if not (np.all(alpha > 0) and np.all(beta > 0)):
        raise ValueError("'alpha' and 'beta' must be positive.")
    s, x2, resid = _rows(sigma2, proj, resid2)
    return _evidence_rows(s, x2, resid, alpha, beta, int(n)).reshape(out_shape)


def logme_fixed_point(
    sigma2: np.ndarray,
    proj: np.ndarray,
    resid2: np.ndarray,
    *,
    n: int,
    d: int,
    tol: float = 1e-3,
    max_iter: int = 100,
) -> LogMEFit:
    """MacKay's fixed point for ``alpha, beta`` and the evidence there, per column.

    LogME, You et al. ICML 2021, Algorithm 1: from ``alpha = beta = 1`` repeat
    ``gamma = sum_i beta s_i / (alpha + beta s_i)``, ``alpha = gamma / ||m||^2``,
    ``beta = (n - gamma) / ||y - F m||^2`` until ``alpha / beta`` changes by at most
    ``tol`` (relative) or ``max_iter`` rounds; every column iterates on its own.

    The evidence is then compared with its limits on the boundary, ``alpha -> inf``
    (``y ~ N(0, ||y||^2 / n I)``) and, when ``F F^T`` is nonsingular,
    ``beta -> inf`` (``y ~ N(0, alpha^-1 F F^T)``), and the larger is returned: there
    the iteration only creeps towards the supremum and would stop short of it.

    Parameters
    ----------
    sigma2 : ndarray, shape (..., r)
        Squared singular values of ``F`` (n, d); zeros allowed, ``r <= min(n, d)``.
    proj : ndarray, shape (..., r, k)
        ``U^T y`` for ``k`` target columns.
    resid2 : ndarray, shape (..., k)
        ``||y||^2 - ||U^T y||^2``; clipped at 0.
    n, d : int
        Shape of ``F``. The evidence depends on ``d`` only through log-alpha terms
        that cancel (see :func:`log_evidence`); ``d`` bounds ``r``.
    tol : float
        Relative tolerance on ``alpha / beta``.
    max_iter : int
        Most fixed-point rounds.

    Returns
    -------
    LogMEFit
        ``evidence``, ``alpha``, ``beta``, ``n_iter``, ``converged``, each (..., k).
        A column with ``y = 0`` has unbounded evidence; it gets NaN.
    """
    if not (isinstance(tol, int | float) and tol > 0):
        raise ValueError(f"'tol' must be a positive number; got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"'max_iter' must be a positive integer; got {max_iter!r}.")
    sigma2, proj, resid2 = _check_spectrum(sigma2, proj, resid2, n, d)
    n = int(n)
    out_shape = resid2.shape
    s, x2, resid = _rows(sigma2, proj, resid2)
    rows = s.shape[0]
    alpha = np.ones(rows)
    beta = np.ones(rows)
    n_iter = np.zeros(rows, dtype=np.int64)
    converged = np.zeros(rows, dtype=bool)

    y_sq = x2.sum(axis=1) + resid
    zero = y_sq <= 0.0
    if np.any(zero):
        logger.warning("%d target column(s) are identically zero; their evidence is "
                       "unbounded and reported as NaN.", int(zero.sum()))
    active = np.flatnonzero(~zero)
    if s.shape[1]:
        s_max = s.max(axis=1)
        # Only a nonsingular F F^T (r = n, all s_i > 0) lets beta run to infinity.
        s_min = s.min(axis=1) if s.shape[1] == n else np.zeros(rows)
    else:
        s_max = s_min = np.zeros(rows)
    for it in range(1, max_iter + 1):
        if active.size == 0:
            break
        sa, xa, ra = s[active], x2[active], resid[active]
        a_old, b_old = alpha[active], beta[active]
        t = a_old / b_old
        gamma, n_minus_gamma, m2, res2, _ = _posterior_terms(sa, xa, ra, t, n)
        # With no signal in F (gamma = 0) alpha is unidentifiable: the evidence does
        # not depend on it, so it stays where it is.
        a_new = np.where(gamma > 0, gamma / np.maximum(m2, _TINY), a_old)
        b_new = n_minus_gamma / np.maximum(res2, _TINY)
        t_new = a_new / b_new
        alpha[active], beta[active] = a_new, b_new
        n_iter[active] = it
        done = np.abs(t_new - t) <= tol * t
        converged[active[done]] = True
        # Once alpha / beta is beyond round-off of the spectrum, the model is numerically
        # on a boundary, whose limit is taken below.
        sm = s_max[active]
        done |= ((sm > 0) & (t_new * _EPS > sm)) | (t_new < s_min[active] * _EPS)
        active = active[~done]

    evidence = np.full(rows, np.nan)
    ok = ~zero
    evidence[ok] = _evidence_rows(s[ok], x2[ok], resid[ok], alpha[ok], beta[ok], n)
    # The supremum may lie on a boundary the iteration was only heading for (common:
    # alpha -> inf for features that carry nothing about a column), where it would
    # crawl for max_iter rounds and still fall short; take the limit there instead.
    if np.any(ok):
        idx = np.flatnonzero(ok)
        ev_b, alpha_b, beta_b = _boundary(s[idx], x2[idx], resid[idx], n)
        # The limit is the supremum: an iteration that got within round-off of it (the
        # interior value may even exceed it by a few ulps) has reached the boundary.
        slack = 1e-10 * np.maximum(1.0, np.abs(evidence[idx]))
        better = ev_b >= evidence[idx] - slack
        idx = idx[better]
        evidence[idx], alpha[idx], beta[idx] = ev_b[better], alpha_b[better], beta_b[better]
        converged[idx] = True
    n_bad = int(np.sum(~converged & ok))
    if n_bad:
        logger.debug("LogME fixed point: %d of %d column(s) not converged after %d rounds.",
                     n_bad, rows, max_iter)
    return LogMEFit(evidence.reshape(out_shape), alpha.reshape(out_shape),
                    beta.reshape(out_shape), n_iter.reshape(out_shape),
                    converged.reshape(out_shape))


def logme_from_spectrum(
    sigma2: np.ndarray,
    proj: np.ndarray,
    resid2: np.ndarray,
    *,
    n: int,
    d: int,
    tol: float = 1e-3,
    max_iter: int = 100,
) -> np.ndarray:
    """LogME evidence per sample for each target column, from the spectrum of ``F``.

    LogME, You et al. ICML 2021; exact for every ``n, d`` (thuml/LogME issue #23).

    Parameters
    ----------
    sigma2 : ndarray, shape (..., r)
        Squared singular values of ``F`` (n, d); zeros allowed, ``r <= min(n, d)``.
    proj : ndarray, shape (..., r, k)
        ``U^T y`` for ``k`` target columns, ``U`` (n, r) the left singular vectors.
    resid2 : ndarray, shape (..., k)
        ``||y||^2 - ||U^T y||^2`` per column; clipped at 0.
    n, d : int
        Shape of ``F``.
    tol, max_iter
        See :func:`logme_fixed_point`.

    Returns
    -------
    ndarray, shape (..., k)
        Maximised log marginal likelihood divided by ``n``.
    """
    return logme_fixed_point(sigma2, proj, resid2, n=n, d=d, tol=tol,
                             max_iter=max_iter).evidence


# --------------------------------------------------------------------------- inputs
def _check_label_kind(label_kind: str) -> None:
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"'label_kind' must be one of {list(LABEL_KINDS)}; got {label_kind!r}.")


def _check_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"'{name}' must be a 2-D array (n, d); got shape {arr.shape}.")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"'{name}' needs at least 2 rows and 1 column; got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"'{name}' must be numeric; got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"'{name}' must be finite; got NaN or inf.")
    return arr


def _targets(
    labels: np.ndarray, n: int, label_kind: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels -> float64 targets (n, k) and the classes (None for regression)."""
    _check_label_kind(label_kind)
    lab = np.asarray(labels)
    if lab.shape[:1] != (n,):
        raise ValueError(f"'labels' must have one entry per row of features ({n}); "
                         f"got shape {lab.shape}.")
    if label_kind == "classification":
        if lab.ndim != 1:
            raise ValueError(f"Classification 'labels' must be 1-D (n,); got shape {lab.shape}.")
        if lab.dtype.kind == "f" and not np.all(np.isfinite(lab)):
            raise ValueError("Classification 'labels' contain NaN or inf.")
        try:
            classes, inverse = np.unique(lab, return_inverse=True)
        except TypeError as err:
            raise ValueError(f"Classification 'labels' must be sortable; got {err}.") from err
        if classes.size < 2:
            raise ValueError(
                f"Classification needs at least 2 classes; got {classes.size} "
                f"({classes.tolist()!r})."
            )
        # You et al. score classification as one regression per one-hot column.
        onehot = np.zeros((n, classes.size))
        onehot[np.arange(n), inverse.reshape(-1)] = 1.0
        return onehot, classes
    if lab.ndim not in (1, 2):
        raise ValueError(f"Regression 'labels' must be (n,) or (n, k); got shape {lab.shape}.")
    if not (np.issubdtype(lab.dtype, np.number) or lab.dtype == bool):
        raise ValueError(f"Regression 'labels' must be numeric; got dtype {lab.dtype}.")
    y = lab.astype(np.float64).reshape(n, -1)
    if y.shape[1] < 1:
        raise ValueError("Regression 'labels' have no columns.")
    if not np.all(np.isfinite(y)):
        raise ValueError("Regression 'labels' must be finite; got NaN or inf.")
    zero = ~np.any(y != 0.0, axis=0)
    if np.any(zero):
        raise ValueError(
            f"Regression target column(s) {np.flatnonzero(zero).tolist()} are identically "
            "zero; their evidence is unbounded."
        )
    return y, None


def _gram_decomposition(
    F: np.ndarray, Y: np.ndarray, *, want_loadings: bool, exact_residual: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Thin SVD ``F = U S V^T`` from the smaller Gram matrix, nonzero directions only.

    Returns ``sigma2 = S^2`` (r,) descending, ``U^T Y`` (r, k), ``resid2`` (k,) and, if
    asked, the loadings ``U^T F = S V^T`` (r, d). Directions with ``s_i`` below
    round-off of the Gram (relative ``max(n, d) * eps``) are dropped: they would
    contribute ``O(s_i / t)`` to the evidence, and their share of ``y`` stays in the
    residual.

    ``resid2 = ||y - U U^T y||^2`` is formed from the residual vector whenever ``U``
    is at hand (``n <= d``) or ``exact_residual`` asks for it, because
    ``||y||^2 - ||U^T y||^2`` carries an error of ``eps ||y||^2`` that the evidence
    multiplies by ``beta``, which is huge when ``y`` is (nearly) in ``span(F)``, as it
    always is for ``n <= d``.
    """
    n, d = F.shape
    if n <= d:
        s, U = np.linalg.eigh(F @ F.T)
    else:
        s, U = np.linalg.eigh(F.T @ F)  # here U holds the right singular vectors V
    s, U = s[::-1], U[:, ::-1]
    cut = max(float(s[0]), 0.0) * max(n, d) * _EPS
    keep = s > cut
    s, U = s[keep], U[:, keep]
    if n <= d:
        coords = U.T @ Y
        loadings = U.T @ F if want_loadings else None
        left: np.ndarray | None = U
    else:
        root = np.sqrt(s)
        coords = (U.T @ (F.T @ Y)) / root[:, None]
        loadings = root[:, None] * U.T if want_loadings else None
        left = (F @ U) / root if exact_residual else None
    if left is not None:
        diff = Y - left @ coords
        resid2 = np.einsum("ij,ij->j", diff, diff)
    else:
        resid2 = np.maximum(np.einsum("ij,ij->j", Y, Y) - np.einsum("ij,ij->j", coords, coords),
                            0.0)
    return s, coords, resid2, loadings


def feature_spectrum(
    features: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The spectrum LogME needs, ``(sigma2, proj, resid2)``, of features for targets.

    LogME, You et al. ICML 2021. Computed from the smaller Gram matrix in float64.

    Parameters
    ----------
    features : ndarray, shape (n, d)
    targets : ndarray, shape (n, k) or (n,)
        Real-valued target columns (e.g. one-hot class indicators).

    Returns
    -------
    sigma2 : ndarray, shape (r,)
        Nonzero squared singular values, descending, ``r <= min(n, d)``.
    proj : ndarray, shape (r, k)
        ``U^T y``.
    resid2 : ndarray, shape (k,)
        ``||y||^2 - ||U^T y||^2``, clipped at 0.
    """
    F = _check_features(features)
    Y = np.asarray(targets, dtype=np.float64)
    Y = Y.reshape(F.shape[0], -1) if Y.ndim == 1 else Y
    if Y.ndim != 2 or Y.shape[0] != F.shape[0]:
        raise ValueError(f"'targets' must be (n,) or (n, k) with n = {F.shape[0]}; "
                         f"got shape {np.shape(targets)}.")
    if not np.all(np.isfinite(Y)):
        raise ValueError("'targets' must be finite; got NaN or inf.")
    s, coords, resid2, _ = _gram_decomposition(F, Y, want_loadings=False, exact_residual=False)
    return s, coords, resid2


# --------------------------------------------------------------------------- estimator
class LogME:
    """LogME transferability score of features for labels.

    LogME, You et al. ICML 2021: the maximised evidence per sample of a Bayesian
    linear model of each target column on the features, averaged over columns
    (one-hot columns for classification). Exact for ``n < d`` (thuml/LogME #23).

    Parameters
    ----------
    label_kind : {"classification", "regression"}
        Classification labels are any sortable ids (ints, strings); regression
        labels are real, (n,) or (n, k).
    tol : float
        Relative tolerance on ``alpha / beta`` in the fixed point.
    max_iter : int
        Most fixed-point rounds.

    Attributes
    ----------
    score_ : float
        Mean of ``evidence_``; higher is better.
    evidence_ : ndarray, shape (k,)
        Evidence per sample of each target column.
    alpha_, beta_ : ndarray, shape (k,)
        Prior and noise precision at the maximum; ``inf`` for a boundary maximum
        (see :func:`logme_fixed_point`).
    n_iter_ : ndarray, shape (k,)
        Fixed-point rounds per column.
    classes_ : ndarray, shape (k,) or None
        Class labels in column order (classification only).
    """

    def __init__(
        self,
        *,
        label_kind: LabelKind = "classification",
        tol: float = 1e-3,
        max_iter: int = 100,
    ) -> None:
        self.label_kind = label_kind
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, features: np.ndarray, labels: np.ndarray) -> LogME:
        """Score ``features`` (n, d) for ``labels`` (n,) or, for regression, (n, k).

        Returns
        -------
        LogME
            ``self``, with ``score_``, ``evidence_``, ``alpha_``, ``beta_`` set.
        """
        _check_label_kind(self.label_kind)
        F = _check_features(features)
        Y, classes = _targets(labels, F.shape[0], self.label_kind)
        sigma2, proj, resid2 = feature_spectrum(F, Y)
        fit = logme_fixed_point(sigma2, proj, resid2, n=F.shape[0], d=F.shape[1],
                                tol=self.tol, max_iter=self.max_iter)
        self.evidence_ = fit.evidence
        self.alpha_ = fit.alpha
        self.beta_ = fit.beta
        self.n_iter_ = fit.n_iter
        self.classes_ = classes
        self.score_ = float(np.mean(fit.evidence))
        return self

    def __repr__(self) -> str:
        return (f"LogME(label_kind={self.label_kind!r}, tol={self.tol!r}, "
                f"max_iter={self.max_iter!r})")


def logme_score(
    features: np.ndarray, labels: np.ndarray, *, label_kind: LabelKind = "classification"
) -> float:
    """LogME score (You et al. ICML 2021) of ``features`` (n, d) for ``labels`` (n,)."""
    return LogME(label_kind=label_kind).fit(features, labels).score_


# --------------------------------------------------------------------------- affine maps
class TargetBasis:
    """The target's decomposition, shared by every affine map scored on it (ESM-LogME).

    For target embeddings ``X`` (n, d) let ``X1 = [X, 1]`` (n, d + 1) with thin SVD
    ``Ux Sx Vx^T`` (``r`` kept directions). An affine map ``z = W x + b`` gives
    ``Z = X1 Wt^T = Ux M`` with ``Wt = [W, b]`` and ``M = Sx Vx^T Wt^T`` (r, d_out),
    so the LogME spectrum of ``Z`` (You et al. ICML 2021) is that of ``M`` and
    ``U_Z^T y = P^T Ux^T y`` for ``M = P Sigma R^T``; see :func:`logme_linear_maps`.

    Parameters
    ----------
    features : ndarray, shape (n, d)
        Target embeddings.
    labels : ndarray, shape (n,) or (n, k)
        As for :class:`LogME`.
    label_kind : {"classification", "regression"}
    rank : int or None
        None keeps every nonzero direction of ``X1``: scores are exact. An int keeps
        the top ``rank`` principal directions only; the rest of ``y`` counts as
        residual. That approximates ``Z`` by its projection on those directions and is
        cheaper per map.

    Attributes
    ----------
    n, d : int
        Shape of ``features``.
    rank : int
        Directions kept, ``<= min(n, d + 1)``.
    full_rank : int
        Nonzero directions of ``X1``.
    sigma2 : ndarray, shape (rank,)
        Squared singular values of ``X1`` kept, descending.
    coords : ndarray, shape (rank, k)
        ``Ux^T Y``.
    loadings : ndarray, shape (rank, d + 1)
        ``Sx Vx^T``.
    y_sq : ndarray, shape (k,)
        ``||y||^2`` per column.
    resid2 : ndarray, shape (k,)
        ``||y||^2 - ||Ux^T y||^2``, clipped at 0.
    classes : ndarray or None
        Class labels in column order (classification only).
    """

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        label_kind: LabelKind = "classification",
        rank: int | None = None,
    ) -> None:
        _check_label_kind(label_kind)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | np.integer)
                                 or rank < 1):
            raise ValueError(f"'rank' must be None or a positive integer; got {rank!r}.")
        X = _check_features(features)
        Y, classes = _targets(labels, X.shape[0], label_kind)
        self.n, self.d = X.shape
        self.label_kind = label_kind
        self.classes = classes
        X1 = np.concatenate([X, np.ones((self.n, 1))], axis=1)
        # Once per target, so the residual is worth forming exactly (see _gram_decomposition).
        sigma2, coords, resid2, loadings = _gram_decomposition(X1, Y, want_loadings=True,
                                                               exact_residual=True)
        assert loadings is not None
        self.full_rank = int(sigma2.size)
        keep = self.full_rank if rank is None else min(int(rank), self.full_rank)
        self.rank = keep
        self.sigma2 = sigma2[:keep]
        self.coords = np.ascontiguousarray(coords[:keep])
        self.loadings = np.ascontiguousarray(loadings[:keep])
        self.y_sq = np.einsum("ij,ij->j", Y, Y)
        # The dropped directions' share of y joins the residual in approximate mode.
        self.resid2 = resid2 + np.einsum("ij,ij->j", coords[keep:], coords[keep:])

    @property
    def n_targets(self) -> int:
        """Number of target columns ``k``."""
        return int(self.y_sq.shape[0])

    def __repr__(self) -> str:
        return (f"TargetBasis(n={self.n}, d={self.d}, rank={self.rank}/{self.full_rank}, "
                f"k={self.n_targets}, label_kind={self.label_kind!r})")


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
