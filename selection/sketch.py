"""ESM sketches: a first-order model of ESM-LogME that an inner-product index can search.

For an affine ESM ``z = W x + b`` the target's mapped features are
``Z = X1 Wt^T`` (``X1 = [X, 1]``, ``Wt = [W, b]``), and LogME (You et al. ICML 2021)
is the maximised marginal likelihood of each label column ``y`` under
``y ~ N(0, beta^-1 I + alpha^-1 Z Z^T) = N(0, beta^-1 I + alpha^-1 X1 G X1^T)`` with
``G = Wt^T Wt``. So ESM-LogME depends on the ESM only through its Gram ``G``, and it
does not change when ``G`` is scaled (``alpha`` absorbs the scale).

The sketch of an ESM is ``G`` compressed to a fixed ``q``-dimensional input basis
``Q`` (the top eigenvectors of the registry's mean trace-normalised Gram, i.e. the
directions the ESMs' top singular subspaces share), trace-normalised:
``H = Q^T G Q / tr(Q^T G Q)``, stored as its upper triangle (off-diagonals times
``sqrt 2``), so that ``<sketch(H), sketch(A)> = tr(A H)``.

The target's query is the gradient of its LogME log-likelihood with respect to ``H``
at the registry's mean sketch ``H0``, with ``alpha, beta`` fitted there (MacKay's
fixed point, as in LogME):
``A = sum_k 1/(2 alpha_k) Xq^T (C_k^-1 y_k y_k^T C_k^-1 - C_k^-1) Xq / (n k)``,
``C_k = beta_k^-1 I + alpha_k^-1 Xq H0 Xq^T``, ``Xq = X1 Q``. Then
``LogME(S) ~ LogME(H0) + tr(A (H_S - H0))``: ranking by the inner product
``<query, sketch_S>`` is ranking by the first-order Taylor model of ESM-LogME in the
ESM's (normalised) Gram, in the spirit of the low-rank "task embedding" views of
Vu et al. 2020 (TaskEmb uses gradients of the target loss as task vectors) applied
to ESM-LogME (Schulte et al. 2024).

That first-order model is coarse: real ESMs differ a lot (``||W - mean||`` is of the
order of ``||W||``) and ESM-LogME is far from linear over that range. So the sketches
are scored a second time (:func:`sketch_logme`, the *middle stage*), exactly this
time, by the LogME of the target projected on the basis: the features ``Xq L_S``
with ``H_S = L_S L_S^T`` have the Gram ``Xq H_S Xq^T``, whose spectrum and ``U^T y``
come from the ``q x q`` matrix ``M_S = T^T H_S T`` (``Xq = U_q D R^T``, ``T = R D``).
That is the cost of one ``q x q`` eigendecomposition per ESM and needs only the
stored sketch, no ESM weights; only the candidates it keeps are read from disk and
scored by the full ESM-LogME (the last stage).
"""

from __future__ import annotations

import numpy as np

from stepstone.selection.logme import _targets, feature_spectrum
from stepstone.selection.logme_evidence import logme_fixed_point, logme_from_spectrum
from stepstone.selection.threads import single_threaded_blas

__all__ = ["MIDDLE_STAGE_POOL", "SketchBasis", "fit_sketch_basis", "middle_stage_pool",
           "sketch_dim", "sketch_logme", "sketch_maps", "target_query"]

DEFAULT_SKETCH_RANK = 48
# Sketches the middle stage (sketch_logme) scores per query when the inner-product
# search runs first, for targets of up to POOL_COLUMNS label columns: 0.3-2 ms each on
# one core at q = 48. Its cost grows with the columns (one LogME fixed point each), so
# targets with more get a proportionally smaller pool (see middle_stage_pool).
MIDDLE_STAGE_POOL = 2000
POOL_COLUMNS = 8


def sketch_dim(q: int) -> int:
    """Length of a sketch vector for a ``q``-dimensional basis: ``q (q + 1) / 2``."""
    return q * (q + 1) // 2


def _pack(M: np.ndarray) -> np.ndarray:
    """Upper triangles of symmetric (..., q, q) matrices, off-diagonals times sqrt 2:
    ``<_pack(A), _pack(H)> = tr(A H)``."""
    q = M.shape[-1]
    iu = np.triu_indices(q)
    scale = np.where(iu[0] == iu[1], 1.0, np.sqrt(2.0))
    return M[..., iu[0], iu[1]] * scale


def _unpack(v: np.ndarray, q: int) -> np.ndarray:
    """Inverse of :func:`_pack`: (..., q (q + 1) / 2) -> symmetric (..., q, q)."""
    v = np.asarray(v, np.float64)
    iu = np.triu_indices(q)
    scale = np.where(iu[0] == iu[1], 1.0, np.sqrt(2.0))
    M = np.zeros(v.shape[:-1] + (q, q))
    M[..., iu[0], iu[1]] = v / scale
    M[..., iu[1], iu[0]] = v / scale
    return M


def _augmented(weights: np.ndarray, biases: np.ndarray | None,
               dtype: type = np.float64) -> np.ndarray:
    W = np.asarray(weights, dtype=dtype)
    if W.ndim == 2:
        W = W[None]
    if W.ndim != 3:
        raise ValueError(f"'weights' must be (B, d_out, d) or (d_out, d); got {W.shape}.")
    b = np.zeros(W.shape[:2], dtype) if biases is None else np.asarray(biases, dtype).reshape(
        W.shape[:2])
    return np.concatenate([W, b[:, :, None]], axis=2)  # (B, d_out, d + 1)


class SketchBasis:
    """The fixed input basis ``Q`` (d + 1, q) and centre ``H0`` (q, q) of a sketch index.

    Fitted once from the registry's maps (:func:`fit_sketch_basis`) and stored with the
    index, so sketches of ESMs added later are comparable with the old ones.
    """

    def __init__(self, basis: np.ndarray, center: np.ndarray) -> None:
        basis = np.asarray(basis, np.float64)
        center = np.asarray(center, np.float64)
        q = basis.shape[1]
        if basis.ndim != 2 or center.shape != (q, q):
            raise ValueError(f"Expected basis (d + 1, q) and center (q, q); got {basis.shape} "
                             f"and {center.shape}.")
        # contiguous: safetensors writes an array's raw buffer
        self.basis, self.center = np.ascontiguousarray(basis), np.ascontiguousarray(center)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.basis.shape[0]) - 1

    @property
    def dim(self) -> int:
        return sketch_dim(self.rank)

    def grams(self, weights: np.ndarray, biases: np.ndarray | None = None) -> np.ndarray:
        """Trace-normalised ``H = Q^T Wt^T Wt Q`` of each map, (B, q, q)."""
        # float32 product (the sketch is a first stage; 4x faster), float64 Gram
        Wt = _augmented(weights, biases, np.float32)
        WQ = (Wt @ self.basis.astype(np.float32)).astype(np.float64)  # (B, d_out, q)
        H = np.swapaxes(WQ, 1, 2) @ WQ
        tr = np.trace(H, axis1=1, axis2=2)
        return H / np.maximum(tr, 1e-300)[:, None, None]


def fit_sketch_basis(weights: np.ndarray, biases: np.ndarray | None = None, *,
                     rank: int = DEFAULT_SKETCH_RANK) -> SketchBasis:
    """The sketch basis of a set of maps: top-``rank`` eigenvectors of their mean
    trace-normalised Gram ``Wt^T Wt`` (the input directions the maps weigh most).

    weights: (B, d_out, d); biases: (B, d_out) or None.
    """
    Wt = _augmented(weights, biases)
    mean = np.zeros((Wt.shape[2], Wt.shape[2]))
    for w in Wt:  # one (d + 1)^2 Gram at a time: memory flat in B
        g = w.T @ w
        mean += g / max(np.trace(g), 1e-300)
    mean /= max(len(Wt), 1)
    rank = min(int(rank), Wt.shape[2])
    _, vecs = np.linalg.eigh(mean)
    basis = vecs[:, ::-1][:, :rank]
    probe = SketchBasis(basis, np.eye(rank))
    return SketchBasis(basis, probe.grams(weights, biases).mean(axis=0))


def sketch_maps(basis: SketchBasis, weights: np.ndarray,
                biases: np.ndarray | None = None) -> np.ndarray:
    """Sketch vectors of affine maps, (B, q (q + 1) / 2) float32."""
    return _pack(basis.grams(weights, biases)).astype(np.float32)


def target_query(basis: SketchBasis, features: np.ndarray, labels: np.ndarray, *,
                 label_kind: str = "classification") -> np.ndarray:
    """The target's query vector, (q (q + 1) / 2,) float32 (see the module docstring).

    features: (n, d) base embeddings; labels: (n,) as for :class:`LogME`.
    """
    X = np.asarray(features, np.float64)
    n = X.shape[0]
    if X.ndim != 2 or X.shape[1] != basis.in_dim:
        raise ValueError(f"'features' must be (n, {basis.in_dim}); got {X.shape}.")
    Y, _ = _targets(labels, n, label_kind)
    Xq = np.concatenate([X, np.ones((n, 1))], axis=1) @ basis.basis  # (n, q)
    lam, vecs = np.linalg.eigh(basis.center)
    F0 = Xq @ (vecs * np.sqrt(np.maximum(lam, 0.0)))  # features whose Gram is Xq H0 Xq^T
    s2, proj, resid2 = feature_spectrum(F0, Y)
    fit = logme_fixed_point(s2, proj, resid2, n=n, d=F0.shape[1])
    U, s, _ = np.linalg.svd(F0, full_matrices=False)
    s2 = s * s
    UtX = U.T @ Xq
    A = np.zeros((basis.rank, basis.rank))
    for k in range(Y.shape[1]):
        alpha, beta = float(fit.alpha[k]), float(fit.beta[k])
        if not (np.isfinite(alpha) and np.isfinite(beta)):
            continue  # a boundary maximum: no gradient in H at first order
        shrink = s2 / (s2 + alpha / beta)
        # C^-1 M = beta (M - U diag(shrink) U^T M): Woodbury on the rank-q part.
        CX = beta * (Xq - U @ (shrink[:, None] * UtX))
        y = Y[:, k]
        Cy = beta * (y - U @ (shrink * (U.T @ y)))
        g = Xq.T @ Cy
        A += (np.outer(g, g) - Xq.T @ CX) / (2.0 * alpha)
    return _pack(A / (n * Y.shape[1])).astype(np.float32)


def sketch_logme(basis: SketchBasis, features: np.ndarray, labels: np.ndarray,
                 sketches: np.ndarray, *, label_kind: str = "classification",
                 batch_size: int = 64) -> np.ndarray:
    """ESM-LogME of the target projected on the sketch basis, from the sketches alone:
    the middle stage of a ranking (see the module docstring), (B,) float64.

    LogME (You et al. ICML 2021) of the features ``X1 Q L_S`` with ``L_S L_S^T = H_S``,
    the sketch's Gram: equal to ESM-LogME when the ESM's Gram is supported on the
    basis, and a far closer model of it than the first-order inner product otherwise.
    Mean evidence over label columns, as in
    :func:`~stepstone.selection.logme_maps.logme_linear_maps`.

    features: (n, d) base embeddings; labels: (n,) as for :class:`LogME`;
    sketches: (B, q (q + 1) / 2) from :func:`sketch_maps` (or an index's stored vectors).
    """
    X = np.asarray(features, np.float64)
    S = np.asarray(sketches)
    n = X.shape[0]
    if X.ndim != 2 or X.shape[1] != basis.in_dim:
        raise ValueError(f"'features' must be (n, {basis.in_dim}); got {X.shape}.")
    if S.ndim != 2 or S.shape[1] != basis.dim:
        raise ValueError(f"'sketches' must be (B, {basis.dim}); got {S.shape}.")
    Y, _ = _targets(labels, n, label_kind)
    out = np.empty(len(S))
    # one BLAS thread: small factorisations (see stepstone.selection.threads)
    with single_threaded_blas():
        Xq = np.concatenate([X, np.ones((n, 1))], axis=1) @ basis.basis  # (n, q)
        U, d, Rt = np.linalg.svd(Xq, full_matrices=False)
        keep = d > d[0] * max(Xq.shape) * np.finfo(np.float64).eps
        T = Rt[keep].T * d[keep]  # (q, r): Xq H Xq^T = U T^T H T U^T
        coords = U[:, keep].T @ Y  # (r, k)
        resid2 = np.maximum(np.einsum("ij,ij->j", Y, Y)
                            - np.einsum("ij,ij->j", coords, coords), 0.0)
        for start in range(0, len(S), batch_size):
            H = _unpack(S[start:start + batch_size], basis.rank)
            s2, P = np.linalg.eigh(T.T @ H @ T)  # (b, r), (b, r, r)
            proj = np.swapaxes(P, 1, 2) @ coords
            ev = logme_from_spectrum(np.maximum(s2, 0.0), proj,
                                     np.broadcast_to(resid2, (len(s2), Y.shape[1])),
                                     n=n, d=T.shape[1])
            out[start:start + batch_size] = ev.mean(axis=1)
    return out


def middle_stage_pool(labels: np.ndarray, k: int, *, label_kind: str = "classification") -> int:
    """How many first-stage candidates the middle stage rescores for a target: at least
    ``k``, else ``MIDDLE_STAGE_POOL`` scaled down for targets with more than
    ``POOL_COLUMNS`` label columns (classes), so its time per query stays bounded."""
    lab = np.asarray(labels)
    if label_kind == "classification":
        columns = int(np.unique(lab).size)
    else:
        columns = 1 if lab.ndim == 1 else int(lab.shape[1])
    return max(int(k), MIDDLE_STAGE_POOL * POOL_COLUMNS // max(columns, POOL_COLUMNS))
