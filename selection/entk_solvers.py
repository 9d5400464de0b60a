"""Solvers for eNTK kernels, and the kernel prediction protocol (settings, few-shot sample).

Malladi et al. ICML 2023 (arXiv 2210.05643): kernel (ridge) regression per output,
and, on the mean kernel over outputs, kernel logistic regression and an SVM.
:func:`solve` fits on the training rows of a
:class:`~stepstone.selection.entk.KernelMatrices` and predicts its evaluation rows
under :class:`KernelSettings`; :func:`few_shot` draws the training sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from stepstone.esm.data import Split
from stepstone.esm.errors import ConfigError
from stepstone.esm.sampling import per_class_indices, uniform_indices
from stepstone.selection.entk import KERNELS, KernelError, KernelMatrices, parse_params

SolverName = Literal["regression", "logistic", "svm"]
SOLVERS: tuple[str, ...] = ("regression", "logistic", "svm")


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices (n,) -> float64 targets (n, num_classes)."""
    out = np.zeros((len(labels), num_classes))
    out[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1.0
    return out


def _check_kernel(K: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 3 or (n is not None and K.shape[2] != n):
        want = "(C, rows, n)" if n is None else f"(C, rows, {n})"
        raise ValueError(f"'{name}' must have shape {want}; got {K.shape}.")
    if not np.isfinite(K).all():
        raise ValueError(f"'{name}' contains NaN or inf.")
    return K


class KernelRegression:
    """Kernel (ridge) regression per output with a relative ridge (Malladi et al. 2023).

    ``alpha_c = (K_c + ridge * ||K_c||_2 I)^+ (Y_c - f0_c)``, prediction
    ``K_c(x, X) alpha_c + f0_c(x)``. ``fit_residual=True`` fits the residual to the
    initial model's outputs ``f0``; otherwise f0 is ignored. With ``ridge=0`` the
    pseudo-inverse gives the minimum-norm interpolant.
    """

    def __init__(self, *, ridge: float = 1e-3, fit_residual: bool = False) -> None:
        if ridge < 0:
            raise ValueError(f"'ridge' must be >= 0; got {ridge}.")
        self.ridge, self.fit_residual = ridge, fit_residual

    def fit(self, K: np.ndarray, Y: np.ndarray, *, f0: np.ndarray | None = None
            ) -> KernelRegression:
        """K: (C, n, n); Y: (n, C) targets (one-hot for classes); f0: (n, C)."""
        K = _check_kernel(K, "K")
        C, n, _ = K.shape
        Y = np.asarray(Y, dtype=np.float64).reshape(n, -1)
        if Y.shape[1] != C:
            raise ValueError(f"'Y' must have shape ({n}, {C}); got {Y.shape}.")
        if self.fit_residual:
            if f0 is None:
                raise ValueError("fit_residual=True needs the initial outputs 'f0'.")
            Y = Y - np.asarray(f0, dtype=np.float64)
        self.alpha_ = np.zeros((n, C))
        for c in range(C):
            A = K[c] + self.ridge * np.linalg.norm(K[c], 2) * np.eye(n)
            self.alpha_[:, c] = np.linalg.lstsq(A, Y[:, c], rcond=None)[0]
        return self

    def predict(self, K_eval: np.ndarray, *, f0: np.ndarray | None = None) -> np.ndarray:
        """K_eval: (C, m, n) -> outputs (m, C)."""
        K_eval = _check_kernel(K_eval, "K_eval", len(self.alpha_))
        out = np.einsum("cmn,nc->mc", K_eval, self.alpha_)
        if self.fit_residual:
            if f0 is None:
                raise ValueError("fit_residual=True needs the initial outputs 'f0'.")
            out = out + np.asarray(f0, dtype=np.float64)
        return out


def _summed(K: np.ndarray) -> np.ndarray:
    """One kernel for all outputs: the mean of the per-output kernels, (rows, n)."""
    return K.mean(0)


def _symmetric(K: np.ndarray) -> np.ndarray:
    Ks = _summed(K)
    if not np.allclose(Ks, Ks.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(Ks).max())):
        raise ValueError("This solver needs a symmetric kernel ('sgd' or 'signgd'); got an "
                         "asymmetric one: use solver='regression' with the 'asym' kernel.")
    return (Ks + Ks.T) / 2


class KernelSVM:
    """scikit-learn's SVC on the precomputed kernel (mean over outputs)."""

    def __init__(self, *, C: float = 1.0) -> None:
        if C <= 0:
            raise ValueError(f"'C' must be > 0; got {C}.")
        self.C = C

    def fit(self, K: np.ndarray, labels: np.ndarray) -> KernelSVM:
        from sklearn.svm import SVC

        self.svc_ = SVC(kernel="precomputed", C=self.C).fit(_symmetric(_check_kernel(K, "K")),
                                                            labels)
        return self

    def decision_function(self, K_eval: np.ndarray) -> np.ndarray:
        """(C, m, n) -> scores (m, num_classes), highest = predicted class."""
        d = self.svc_.decision_function(_summed(_check_kernel(K_eval, "K_eval")))
        return np.stack([-d, d], 1) if d.ndim == 1 else d

    def predict(self, K_eval: np.ndarray) -> np.ndarray:
        return self.svc_.predict(_summed(_check_kernel(K_eval, "K_eval")))


class KernelLogistic:
    """Kernel logistic regression, exactly, through scikit-learn's LogisticRegression.

    With ``K = V diag(s) V^T`` on the training set, the features ``V diag(sqrt s)``
    reproduce K, and an L2 penalty on their weights is the RKHS norm, so the
    representer theorem makes the fit equal to kernel logistic regression;
    evaluation rows map by ``K(x, X) V diag(1/sqrt s)`` (mean kernel over outputs).
    """

    def __init__(self, *, C: float = 1.0, tol: float = 1e-10) -> None:
        if C <= 0:
            raise ValueError(f"'C' must be > 0; got {C}.")
        self.C, self.tol = C, tol

    def fit(self, K: np.ndarray, labels: np.ndarray) -> KernelLogistic:
        from sklearn.linear_model import LogisticRegression

        s, V = np.linalg.eigh(_symmetric(_check_kernel(K, "K")))
        keep = s > self.tol * max(s.max(), 0.0)
        if not keep.any():
            raise KernelError("The kernel has no positive eigenvalue; cannot fit.")
        self.basis_ = V[:, keep] / np.sqrt(s[keep])
        features = V[:, keep] * np.sqrt(s[keep])
        self.model_ = LogisticRegression(C=self.C, max_iter=5000).fit(features, labels)
        return self

    def decision_function(self, K_eval: np.ndarray) -> np.ndarray:
        d = self.model_.decision_function(_summed(_check_kernel(K_eval, "K_eval"))
                                          @ self.basis_)
        return np.stack([-d, d], 1) if d.ndim == 1 else d

    def predict(self, K_eval: np.ndarray) -> np.ndarray:
        return self.model_.classes_[self.decision_function(K_eval).argmax(1)]


@dataclass
class KernelSettings:
    """How the eNTK is computed and solved (Malladi et al. 2023)."""

    kernel: str = field(default="sgd", metadata={
        "help": "Kernel formula: sgd (<g, g'>), signgd (<sign g, sign g'>), asym "
                "(<g, sign g_train>, Adam's kernel)."})
    params: str = field(default="biases", metadata={
        "help": "Parameter subset: biases, lastk:K (last K blocks) or all."})
    include_head: bool = field(default=True, metadata={
        "help": "Also differentiate the head (the classifier layer)."})
    solver: str = field(default="regression", metadata={
        "help": "regression (kernel ridge), logistic (kernel logistic regression) or svm."})
    ridge: float = field(default=1e-3, metadata={
        "help": "Relative ridge for regression: lambda * ||K||_2 is added to the diagonal."})
    fit_residual: bool = field(default=False, metadata={
        "help": "Regression: fit the residual to the initial model's outputs."})
    C: float = field(default=1.0, metadata={"help": "Inverse regularisation (logistic, svm)."})
    chunk_size: int = field(default=8, metadata={"help": "Examples per vmap call."})
    max_memory_mb: float = field(default=1024.0, metadata={
        "help": "Budget for the held training gradients (MiB)."})
    sign_eps: float = field(default=1e-6, metadata={
        "help": "Sign kernels: gradient entries below this share of the largest count as 0."})

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise KernelError(f"'kernel' must be one of {list(KERNELS)}; got {self.kernel!r}.")
        if self.solver not in SOLVERS:
            raise KernelError(f"'solver' must be one of {list(SOLVERS)}; got {self.solver!r}.")
        parse_params(self.params)
        if (self.ridge < 0 or self.C <= 0 or self.chunk_size < 1 or self.max_memory_mb <= 0
                or not 0 <= self.sign_eps < 1):
            raise KernelError(f"Need ridge >= 0, C > 0, chunk_size >= 1, max_memory_mb > 0, "
                             f"0 <= sign_eps < 1; got {self.ridge}, {self.C}, "
                             f"{self.chunk_size}, {self.max_memory_mb}, {self.sign_eps}.")

        if self.fit_residual and self.solver != "regression":
            raise KernelError(f"'fit_residual' needs solver='regression'; got {self.solver!r}.")
        if self.kernel == "asym" and self.solver != "regression":
            raise KernelError("The asym kernel is not symmetric: it needs solver='regression'; "
                             f"got {self.solver!r}.")

    def kernel_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`compute_kernel` these settings fix."""
        return {"kernel": self.kernel, "params": self.params, "include_head": self.include_head,
                "chunk_size": self.chunk_size, "max_memory_mb": self.max_memory_mb,
                "sign_eps": self.sign_eps}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def solve(km: KernelMatrices, labels: np.ndarray, *, label_kind: str,
          settings: KernelSettings) -> np.ndarray:
    """Fit on ``km.train`` and predict for ``km.eval``: (m, C) scores or (m,) values."""
    if km.eval is None:
        raise ValueError("Need a kernel with evaluation rows ('eval' given to compute_kernel).")
    C = km.train.shape[0]
    if label_kind == "regression":
        if settings.solver != "regression":
            raise KernelError(f"A regression target needs solver='regression'; got "
                             f"{settings.solver!r}.")
        reg = KernelRegression(ridge=settings.ridge, fit_residual=settings.fit_residual)
        reg.fit(km.train, np.asarray(labels, dtype=np.float64)[:, None], f0=km.f0_train)
        return reg.predict(km.eval, f0=km.f0_eval)[:, 0]
    if settings.solver == "regression":
        reg = KernelRegression(ridge=settings.ridge, fit_residual=settings.fit_residual)
        reg.fit(km.train, one_hot(labels, C), f0=km.f0_train)
        return reg.predict(km.eval, f0=km.f0_eval)
    est = (KernelLogistic(C=settings.C) if settings.solver == "logistic"
           else KernelSVM(C=settings.C)).fit(km.train, labels)
    scores = np.full((km.eval.shape[1], C), -np.inf)
    classes = (est.model_ if settings.solver == "logistic" else est.svc_).classes_
    scores[:, classes] = est.decision_function(km.eval)
    return scores


def few_shot(split: Split, shots: int, *, label_kind: str, seed: int = 0) -> Split:
    """``shots`` examples per class (all of a smaller class), seeded; regression: ``shots``."""
    if shots < 1:
        raise ConfigError(f"'shots' must be >= 1; got {shots}.")
    if label_kind == "regression":
        return split.take(uniform_indices(len(split), shots, seed=seed))
    return split.take(per_class_indices(split.labels, shots, seed=seed))
