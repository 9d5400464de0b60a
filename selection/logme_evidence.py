"""The core of LogME: evidence and MacKay's fixed point, from the spectrum of the features.

LogME (You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models
for Transfer Learning", ICML 2021) is the evidence of Bayesian linear regression
``y = F m + noise`` (prior ``m ~ N(0, alpha^-1 I_d)``, noise ``N(0, beta^-1 I_n)``),
maximised over ``alpha, beta``, per sample. Everything here works from the spectrum
of ``F`` (n, d): ``sigma2`` (squared singular values), ``proj = U^T y`` and the part
of ``||y||^2`` outside ``span(U)``, which makes the evidence exact for every shape
(``n < d`` included; thuml/LogME issue #23) and takes the closed-form limit where
the maximum lies on the boundary (``alpha -> inf``, or ``beta -> inf`` for ``n <= d``).

Every LogME entry point ends in :func:`logme_fixed_point`: :class:`~stepstone.selection.logme.LogME`
(features, via :func:`~stepstone.selection.logme.feature_spectrum`) and the ESM-LogME
batch path :func:`~stepstone.selection.logme_maps.evidence_linear_maps` (affine maps
of shared target embeddings). :func:`log_evidence` evaluates the evidence at given
``alpha, beta`` (for checks against a brute-force formula).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from stepstone.selection.nogil_lapack import solve_shifted_tridiagonal

logger = logging.getLogger(__name__)

# Denominator floor in the fixed point: keeps alpha (or beta) finite, if huge, when y
# is orthogonal to the features (or fitted exactly), where the optimum is at infinity.
_TINY = 1e-300
_EPS = float(np.finfo(np.float64).eps)
# Relative size below which a residual share of ||y||^2 is round-off of the projection.
_ROUNDOFF = 1e-10
_LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["LogMEFit", "log_evidence", "logme_fixed_point", "logme_from_spectrum",
           "logme_from_tridiagonal"]


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


class _Columns:
    """The target columns the fixed point runs on, one row per (batch item, column).

    The fixed point and the evidence need, at ``t = alpha / beta``, the posterior terms
    (:meth:`terms`) and, for the noise-free limit, ``y^T (F F^T)^-1 y`` and
    ``log|F F^T|`` (:meth:`noise_free_parts`). :class:`_SpectrumColumns` has them from
    the spectrum and ``U^T y``; ``logme_maps`` adds a tridiagonal form that needs no
    eigenvectors.
    """

    n: int
    s: np.ndarray
    """(N, r) eigenvalues of ``F^T F`` (or ``F F^T``), zeros allowed."""
    y_sq: np.ndarray
    """(N,) ``||y||^2``."""

    @property
    def rows(self) -> int:
        return int(self.s.shape[0])

    def terms(
        self, idx: np.ndarray, t: np.ndarray, *, logdet: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """gamma, n - gamma, ||m||^2, ||y - F m||^2 and (if asked) sum_i log(1 + s_i / t),
        all (len(idx),), for the posterior mean ``m`` at ``t = alpha / beta``."""
        raise NotImplementedError

    def noise_free_parts(
        self, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``y^T (F F^T)^+ y``, ``log pdet(F F^T)``, whether ``y`` leaves ``span(F)``
        and whether ``F F^T`` (n, n) is singular, per row of ``idx``."""
        raise NotImplementedError


def _eigen_terms(
    s: np.ndarray, t: np.ndarray, n: int, logdet: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """denom = s + t, q = t / denom, gamma, n - gamma, sum log(1 + s / t) (or None)."""
    denom = s + t[:, None]
    q = t[:, None] / denom  # t / (t + s_i): the share of y_i left in the residual
    gamma = (s / denom).sum(axis=1)
    # n - gamma summed from its positive parts: no cancellation when gamma -> r = n.
    n_minus_gamma = (n - s.shape[1]) + q.sum(axis=1)
    log_det = np.log1p(s / t[:, None]).sum(axis=1) if logdet else None
    return denom, q, gamma, n_minus_gamma, log_det


class _SpectrumColumns(_Columns):
    """Rows from the spectrum: s, x2 = (U^T y)^2 (N, r); resid (N,), y outside span(U)."""

    def __init__(self, s: np.ndarray, x2: np.ndarray, resid: np.ndarray, n: int) -> None:
        self.s, self.x2, self.resid, self.n = s, x2, resid, n
        self.y_sq = x2.sum(axis=1) + resid

    def terms(self, idx, t, *, logdet=False):
        s, x2 = self.s[idx], self.x2[idx]
        denom, q, gamma, n_minus_gamma, log_det = _eigen_terms(s, t, self.n, logdet)
        m2 = (s * x2 / (denom * denom)).sum(axis=1)
        res2 = (x2 * q * q).sum(axis=1) + self.resid[idx]
        return gamma, n_minus_gamma, m2, res2, log_det

    def noise_free_parts(self, idx):
        s, x2, resid, y_sq = self.s[idx], self.x2[idx], self.resid[idx], self.y_sq[idx]
        outside = (resid > _ROUNDOFF * y_sq) | np.any(
            (s <= 0) & (x2 > _ROUNDOFF * y_sq[:, None]), axis=1)
        singular = (s.shape[1] < self.n) | np.any(s <= 0, axis=1)
        safe = np.where(s > 0, s, 1.0)
        quad = (x2 / safe * (s > 0)).sum(axis=1)
        return quad, np.log(safe).sum(axis=1), outside, singular


def _evidence_rows(cols: _Columns, idx: np.ndarray, alpha: np.ndarray,
                   beta: np.ndarray) -> np.ndarray:
    """Per-sample evidence of the rows ``idx`` (see :func:`log_evidence`).

    ``alpha = inf`` or ``beta = inf`` give the limits there (see :func:`_boundary`).
    """
    n = cols.n
    ev = np.empty(idx.size)
    a_inf = np.isinf(alpha)
    b_inf = np.isinf(beta) & ~a_inf
    mid = ~(a_inf | b_inf)
    if np.any(mid):
        a, b = alpha[mid], beta[mid]
        _, _, m2, res2, logdet = cols.terms(idx[mid], a / b, logdet=True)
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
        b = beta[a_inf]
        ev[a_inf] = 0.5 * np.log(b) - 0.5 * _LOG_2PI - 0.5 * b * cols.y_sq[idx[a_inf]] / n
    if np.any(b_inf):
        ev[b_inf] = _noise_free_evidence(cols, idx[b_inf], alpha[b_inf])
    return ev


def _noise_free_evidence(cols: _Columns, idx: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``log N(y | 0, alpha^-1 F F^T) / n``, the ``beta -> inf`` limit, per row.

    Finite only when ``F F^T`` is nonsingular (``r = n``, every ``s_i > 0``) and so
    ``y`` has no residual; ``-inf`` when ``y`` leaves ``span(F)``; ``+inf`` when ``y``
    lies in a proper subspace of ``R^n`` spanned by ``F`` (the density is unbounded).
    ``resid`` up to ``_ROUNDOFF * ||y||^2`` counts as zero.
    """
    n = cols.n
    quad, logdet, outside, singular = cols.noise_free_parts(idx)
    ev = -0.5 * (_LOG_2PI + (logdet - n * np.log(alpha) + alpha * quad) / n)
    return np.where(outside, -np.inf, np.where(singular, np.inf, ev))


def _boundary(cols: _Columns, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best evidence on the finite boundaries of (alpha, beta), per row of ``idx``.

    The fixed point runs off to one when no interior maximum exists: ``alpha -> inf``
    (the features explain nothing; ``beta = n / ||y||^2``) or, when ``F F^T`` is
    nonsingular (``n <= d``), ``beta -> inf`` (noise-free fit; ``alpha = n / y^T
    (F F^T)^-1 y``). Returns ``evidence, alpha, beta`` of the better one.
    """
    n = cols.n
    beta_inf = n / cols.y_sq[idx]
    ev = 0.5 * np.log(beta_inf) - 0.5 * _LOG_2PI - 0.5
    alpha = np.full(idx.size, np.inf)
    beta = beta_inf
    if cols.s.shape[1] == n:
        quad, _, _, _ = cols.noise_free_parts(idx)
        alpha0 = n / np.maximum(quad, _TINY)
        ev0 = _noise_free_evidence(cols, idx, alpha0)
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
    cols = _SpectrumColumns(*_rows(sigma2, proj, resid2), int(n))
    return _evidence_rows(cols, np.arange(cols.rows), alpha, beta).reshape(out_shape)


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
    _check_fixed_point_args(tol, max_iter)
    sigma2, proj, resid2 = _check_spectrum(sigma2, proj, resid2, n, d)
    out_shape = resid2.shape
    fit = _fixed_point(_SpectrumColumns(*_rows(sigma2, proj, resid2), int(n)), tol, max_iter)
    return LogMEFit(*(field.reshape(out_shape) for field in fit))


def _check_fixed_point_args(tol: float, max_iter: int) -> None:
    if not (isinstance(tol, int | float) and tol > 0):
        raise ValueError(f"'tol' must be a positive number; got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"'max_iter' must be a positive integer; got {max_iter!r}.")


def _fixed_point(cols: _Columns, tol: float, max_iter: int) -> LogMEFit:
    """:func:`logme_fixed_point` on the rows of ``cols``; every field has shape (N,)."""
    _check_fixed_point_args(tol, max_iter)
    n, s, rows = cols.n, cols.s, cols.rows
    alpha = np.ones(rows)
    beta = np.ones(rows)
    n_iter = np.zeros(rows, dtype=np.int64)
    converged = np.zeros(rows, dtype=bool)

    zero = cols.y_sq <= 0.0
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
        a_old, b_old = alpha[active], beta[active]
        t = a_old / b_old
        gamma, n_minus_gamma, m2, res2, _ = cols.terms(active, t)
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
    ok = np.flatnonzero(~zero)
    evidence[ok] = _evidence_rows(cols, ok, alpha[ok], beta[ok])
    # The supremum may lie on a boundary the iteration was only heading for (common:
    # alpha -> inf for features that carry nothing about a column), where it would
    # crawl for max_iter rounds and still fall short; take the limit there instead.
    if ok.size:
        ev_b, alpha_b, beta_b = _boundary(cols, ok)
        # The limit is the supremum: an iteration that got within round-off of it (the
        # interior value may even exceed it by a few ulps) has reached the boundary.
        slack = 1e-10 * np.maximum(1.0, np.abs(evidence[ok]))
        better = ev_b >= evidence[ok] - slack
        idx = ok[better]
        evidence[idx], alpha[idx], beta[idx] = ev_b[better], alpha_b[better], beta_b[better]
        converged[idx] = True
    n_bad = int(np.sum(~converged[ok]))
    if n_bad:
        logger.debug("LogME fixed point: %d of %d column(s) not converged after %d rounds.",
                     n_bad, rows, max_iter)
    return LogMEFit(evidence, alpha, beta, n_iter, converged)


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


# ------------------------------------------------------------------- tridiagonal form
class _NotDefinite(np.linalg.LinAlgError):
    """A shifted tridiagonal system was not numerically positive definite."""


class _TridiagonalColumns(_Columns):
    """Rows from a tridiagonal form ``T = Q^T (F^T F) Q`` and ``c = Q^T U^T y``.

    Every term the fixed point needs is ``g(T)`` between ``c`` and ``c`` for a
    rational ``g`` (``||m||^2 = c^T T (T + t)^-2 c``, the residual inside the span
    ``t^2 c^T (T + t)^-2 c``), so one tridiagonal solve per round replaces the
    eigenvectors of ``T``; only its eigenvalues ``s`` are needed (for ``gamma`` and
    the log-determinant).
    """

    def __init__(self, s: np.ndarray, diag: np.ndarray, off: np.ndarray, c: np.ndarray,
                 resid: np.ndarray, n: int) -> None:
        self.s, self.diag, self.off, self.c, self.resid, self.n = s, diag, off, c, resid, n
        self.y_sq = np.einsum("ij,ij->i", c, c) + resid

    def _solve(self, idx: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``w = (T + t I)^-1 c`` and ``T w`` for the rows ``idx`` (each (len(idx), r)).

        LDL^T per row (LAPACK dptsv through ctypes, GIL released): stable, as
        ``T + t I`` is symmetric positive definite; raises :class:`_NotDefinite` if
        round-off made one indefinite (an eigenvalue of ``T`` near 0 and ``t`` below
        its error), for the caller to use the eigenvectors instead.
        """
        diag, off = self.diag[idx], self.off[idx]
        w, ok = solve_shifted_tridiagonal(diag, off, t, self.c[idx])
        if not ok.all():
            raise _NotDefinite
        tw = diag * w
        tw[:, :-1] += off * w[:, 1:]
        tw[:, 1:] += off * w[:, :-1]
        return w, tw

    def terms(self, idx, t, *, logdet=False):
        _, _, gamma, n_minus_gamma, log_det = _eigen_terms(self.s[idx], t, self.n, logdet)
        w, tw = self._solve(idx, t)
        m2 = np.einsum("ij,ij->i", w, tw)
        res2 = t * t * np.einsum("ij,ij->i", w, w) + self.resid[idx]
        return gamma, n_minus_gamma, m2, res2, log_det

    def noise_free_parts(self, idx):
        # Only reached when r = n, where the caller guarantees every s_i > 0.
        s, y_sq = self.s[idx], self.y_sq[idx]
        w, _ = self._solve(idx, np.zeros(idx.size))
        quad = np.einsum("ij,ij->i", self.c[idx], w)
        singular = (s.shape[1] < self.n) | np.any(s <= 0, axis=1)
        outside = self.resid[idx] > _ROUNDOFF * y_sq
        return quad, np.log(np.where(s > 0, s, 1.0)).sum(axis=1), outside, singular


def logme_from_tridiagonal(
    sigma2: np.ndarray,
    diag: np.ndarray,
    off: np.ndarray,
    coords: np.ndarray,
    resid2: np.ndarray,
    *,
    n: int,
    tol: float = 1e-3,
    max_iter: int = 100,
) -> np.ndarray:
    """LogME evidence per sample from a tridiagonal form of ``F^T F``, no eigenvectors.

    The same maximised evidence as :func:`logme_from_spectrum` (You et al. ICML 2021,
    MacKay's fixed point; equal up to round-off), for ``F^T F = Q T Q^T`` with ``T``
    symmetric tridiagonal, from ``T``, its eigenvalues and ``Q^T U_F^T y``
    (:class:`_TridiagonalColumns`). Trusted input from
    :func:`~stepstone.selection.logme_maps.evidence_linear_maps`: shapes are not
    checked.

    Parameters
    ----------
    sigma2 : ndarray, shape (B, r)
        Eigenvalues of ``T``, non-negative (round-off set to 0 by the caller). When
        ``r = n`` every one must be positive (else use :func:`logme_from_spectrum`).
    diag, off : ndarray, shapes (B, r) and (B, r - 1)
        ``T``'s diagonal and off-diagonal.
    coords : ndarray, shape (B, r, k)
        ``Q^T c`` for the target's coordinates ``c`` in an orthonormal basis of the
        rows of ``F`` (``proj = Z^T Q^T c`` for ``T``'s eigenvectors ``Z``).
    resid2 : ndarray, shape (B, k)
        The part of ``||y||^2`` outside that basis.
    n : int
        Rows of ``F``.
    tol, max_iter
        See :func:`logme_fixed_point`.

    Returns
    -------
    ndarray, shape (B, k)

    Raises
    ------
    numpy.linalg.LinAlgError
        If round-off made some ``T + t I`` indefinite (``T`` numerically singular and
        ``t`` below its error): use :func:`logme_from_spectrum` for those maps.
    """
    n_maps, r = sigma2.shape
    k = coords.shape[2]
    cols = _TridiagonalColumns(np.repeat(sigma2, k, axis=0), np.repeat(diag, k, axis=0),
                               np.repeat(off, k, axis=0),
                               np.swapaxes(coords, 1, 2).reshape(n_maps * k, r),
                               np.maximum(resid2, 0.0).reshape(n_maps * k), int(n))
    return _fixed_point(cols, tol, max_iter).evidence.reshape(n_maps, k)
