"""LogME: the log marginal evidence of a linear model on fixed features.

LogME (You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models
for Transfer Learning", ICML 2021) scores features ``F`` (n, d) for targets ``y``
(n,) by the evidence of Bayesian linear regression ``y = F m + noise`` with prior
``m ~ N(0, alpha^-1 I_d)`` and noise ``N(0, beta^-1 I_n)``, maximised over
``alpha, beta`` by MacKay's fixed point, divided by ``n`` and averaged over
target columns (one-hot columns for classification).

One computation, three modules:

- here, the inputs: labels to target columns, the spectrum of the features
  (:func:`feature_spectrum`), the estimator :class:`LogME` and :func:`logme_score`
  (a one-line wrapper), and :class:`TargetBasis`, the target's decomposition shared by
  every affine map scored on it;
- :mod:`stepstone.selection.logme_evidence`, the core: evidence and fixed point from
  a spectrum (exact for ``n < d``, where the reference implementation, thuml/LogME,
  copied by hf-dataset-selector, drops the ``(d - r) log alpha`` part of
  ``log|alpha I + beta F^T F|``: thuml/LogME issue #23);
- :mod:`stepstone.selection.logme_maps`, ESM-LogME's fast path: for affine maps
  ``z = W x + b`` of shared target embeddings ``X``, the spectrum of
  ``Z = [X, 1] [W, b]^T`` follows from a small matrix built from the
  :class:`TargetBasis`, so ``Z`` is never materialised.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

from stepstone.selection.logme_evidence import logme_fixed_point

LabelKind = Literal["classification", "regression"]
LABEL_KINDS: tuple[str, ...] = ("classification", "regression")

_EPS = float(np.finfo(np.float64).eps)

__all__ = ["LABEL_KINDS", "LabelKind", "LogME", "TargetBasis", "feature_spectrum",
           "logme_score"]


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


# ------------------------------------------ the target side of ESM-LogME (see logme_maps)
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
    triangular : tuple of ndarray, shapes (rank, d + 1) and (rank, k)
        ``loadings`` and ``coords`` rotated so that the loadings are upper
        triangular (computed on first use).
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

    @functools.cached_property
    def triangular(self) -> tuple[np.ndarray, np.ndarray]:
        """The same decomposition in another orthonormal basis of ``span(Ux)``.

        ``(R, Q^T coords)`` from ``loadings = Q R`` (QR, ``R`` upper triangular or
        trapezoidal, (rank, d + 1)): ``X1 = (Ux Q) R``, so every map's spectrum and
        ``U_Z^T y`` are unchanged, and a square ``R`` halves the per-map product
        ``Wt R^T`` (a triangular multiply) for ESM-LogME.
        """
        q, r = np.linalg.qr(self.loadings)
        return np.ascontiguousarray(r), np.ascontiguousarray(q.T @ self.coords)

    @property
    def n_targets(self) -> int:
        """Number of target columns ``k``."""
        return int(self.y_sq.shape[0])

    def __repr__(self) -> str:
        return (f"TargetBasis(n={self.n}, d={self.d}, rank={self.rank}/{self.full_rank}, "
                f"k={self.n_targets}, label_kind={self.label_kind!r})")
