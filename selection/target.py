"""A target prepared once for scoring: base embeddings, labels and derived statistics."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from stepstone.esm.data import token_counts
from stepstone.esm.encoder import EncoderIdentity


@dataclass(eq=False)
class Target:
    """What every scorer needs about a target task.

    Parameters
    ----------
    task_id : str
    X : float32 array of shape (n, d)
        Base-encoder embeddings of the target's (capped) training texts.
    labels : array of shape (n,)
        Class indices (classification) or values (regression).
    label_kind : {'classification', 'regression'}
    texts : list of str, length n
    encoder : EncoderIdentity
        The encoder configuration that produced ``X``.
    """

    task_id: str
    X: np.ndarray
    labels: np.ndarray
    label_kind: str
    texts: list[str]
    encoder: EncoderIdentity
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or len(self.X) != len(self.labels):
            raise ValueError(f"Target embeddings must be (n, d) with n = {len(self.labels)} "
                             f"labels; got {self.X.shape}.")
        if not np.isfinite(self.X).all():
            raise ValueError("Target embeddings contain NaN or inf.")

    def memo(self, key, compute):
        """Compute a derived quantity once per target (shared across scorers and chunks)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def base_logme(self) -> float:
        """LogME of the base embeddings: the "no intermediate step" reference."""
        from stepstone.selection.logme import logme_score

        return self.memo("base_logme", lambda: logme_score(self.X, self.labels,
                                                           label_kind=self.label_kind))

    @property
    def n(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def mean_vector(self) -> np.ndarray:
        """L2-normalised mean embedding, shape (d,) (TextEmb, Vu et al. 2020)."""
        mean = self.X.astype(np.float64).mean(0)
        return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)

    @functools.cached_property
    def token_counts(self) -> dict[str, int]:
        """Word counts of the target texts (vocabulary-overlap baseline)."""
        return token_counts(self.texts)
