"""Embedding Space Maps (Schulte, Hamborg, Akbik, EMNLP 2024, arXiv 2410.15148).

An ESM is a small network with ``ESM(x) ≈ y``, where ``x`` is a text's embedding
under the base encoder and ``y`` its embedding under the encoder fine-tuned on a
source task. Trained once per source, it lets a target's base embeddings stand in
for what the fine-tuned source model would produce.

On disk an ESM is a folder with ``config.json`` (:class:`ESMConfig`, indent=2,
sorted keys) and ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from stepstone.esm.encoder import EncoderIdentity, EncoderMismatchError
from stepstone.esm.errors import ConfigError, StepstoneError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
Architecture = Literal["linear", "lowrank", "mlp"]
ARCHITECTURES: tuple[str, ...] = ("linear", "lowrank", "mlp")
AFFINE_ARCHITECTURES: tuple[str, ...] = ("linear", "lowrank")  # ESM(x) = W x + b exactly


class ESMFormatError(StepstoneError, ValueError):
    """An ESM folder is missing files or required config keys."""


class ESMFitError(StepstoneError, ValueError):
    """A fitted map predicts the tuned embeddings worse than the identity map does."""


def check_fit(result: FitResult, *, what: str) -> None:
    """Refuse a map that explains less of the fine-tuning shift than no map at all."""
    captured = result.shift_captured
    if captured is not None and captured < 0:
        raise ESMFitError(
            f"The ESM of {what} is worse than the identity map on held-out pairs (MSE "
            f"{result.val_mse:.4g} vs {result.identity_val_mse:.4g}); refit it with "
            "ESMFitSettings(method='ridge') (closed form) or more epochs.")


FIT_METHODS: tuple[str, ...] = ("ridge", "adamw")
# Ridge strengths tried on the held-out pairs, relative to the mean eigenvalue of the
# centred Gram matrix X^T X (so the grid does not depend on the embeddings' scale).
RIDGE_GRID: tuple[float, ...] = tuple(10.0 ** k for k in range(-6, 3))


@dataclass
class ESMFitSettings:
    """How an ESM is fitted to (base, tuned) embedding pairs.

    ``ridge`` (default) is the closed-form least-squares fit shrunk towards the
    identity map, with its strength chosen on the held-out pairs: exact, so it is
    converged by construction (``lowrank``: reduced-rank ridge). ``adamw`` is the
    paper's recipe (mini-batch AdamW from a random start for a fixed number of
    epochs), kept for comparison; ``mlp`` has no closed form and needs it.
    """

    method: str = field(
        default="ridge", metadata={"help": "Fit: 'ridge' (closed form) or 'adamw' (the paper's)."})
    epochs: int = field(
        default=10, metadata={"help": "adamw: passes over the (base, tuned) pairs."})
    batch_size: int = field(default=32, metadata={"help": "adamw: mini-batch size."})
    lr: float = field(default=1e-3, metadata={"help": "adamw: learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "adamw: weight decay."})
    alpha: float | None = field(
        default=None, metadata={"help": "ridge: strength relative to the mean Gram eigenvalue "
                                        "(default: chosen on the held-out pairs)."})
    val_fraction: float = field(
        default=0.1, metadata={"help": "Share of pairs held out to report validation MSE."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for init, shuffling and the split."})

    def __post_init__(self) -> None:
        if self.method not in FIT_METHODS:
            raise ConfigError(f"'method' must be one of {list(FIT_METHODS)}; got {self.method!r}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"'epochs' and 'batch_size' must be >= 1; got {self.epochs}, {self.batch_size}."
            )
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"Need lr > 0 and weight_decay >= 0; got {self.lr}, "
                              f"{self.weight_decay}.")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"'alpha' must be > 0 or None; got {self.alpha}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"'val_fraction' must be in [0, 1); got {self.val_fraction}.")

    def key_dict(self) -> dict[str, Any]:
        """The settings that change the fitted map for this method (recorded in the
        ESM's config and in registry build keys). An ``adamw`` fit records exactly the
        fields it had before ``method`` existed, so its keys are unchanged."""
        if self.method == "adamw":
            names = ("epochs", "batch_size", "lr", "weight_decay", "val_fraction", "seed")
        else:
            names = ("method", "alpha", "val_fraction", "seed")
        return {n: getattr(self, n) for n in names}


@dataclass
class ESMConfig:
    """Everything recorded with an ESM: architecture, provenance and fit results."""

    architecture: str = "linear"
    in_dim: int = 384
    out_dim: int = 384
    rank: int | None = None
    hidden_dim: int | None = None
    encoder: dict[str, Any] = field(default_factory=dict)
    task_id: str = ""
    task_data_hash: str = ""
    task_origin: str = ""
    # How to load the source data again from anywhere (Task.spec: absolute paths,
    # columns, options); empty for ESMs built before it was recorded.
    task_spec: dict[str, Any] = field(default_factory=dict)
    num_examples: int = 0
    label_kind: str = "classification"
    classes: list[str] = field(default_factory=list)
    finetune: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    REQUIRED = ("architecture", "in_dim", "out_dim", "encoder", "task_id")

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"'architecture' must be one of {list(ARCHITECTURES)}; got {self.architecture!r}."
            )
        if self.in_dim < 1 or self.out_dim < 1:
            raise ValueError(f"Dims must be positive; got {self.in_dim} -> {self.out_dim}.")
        if self.architecture == "lowrank":
            if self.in_dim != self.out_dim:
                raise ValueError("A low-rank residual ESM needs in_dim == out_dim; got "
                                 f"{self.in_dim} -> {self.out_dim}.")
            if not self.rank or not 1 <= self.rank <= self.in_dim:
                raise ValueError(f"'rank' must be in [1, {self.in_dim}]; got {self.rank}.")
        if self.architecture == "mlp" and (not self.hidden_dim or self.hidden_dim < 1):
            raise ValueError(f"'hidden_dim' must be a positive int for mlp; got {self.hidden_dim}.")

    @property
    def encoder_identity(self) -> EncoderIdentity:
        e = self.encoder
        return EncoderIdentity(e.get("name", ""), e.get("fingerprint", ""), e.get("pooling", ""),
                               e.get("max_length", 0), e.get("layer"), self.in_dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ESMConfig:
        """Build from a stored dict: raises on missing required keys, warns on unknown."""
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise ESMFormatError(f"ESM config lacks required key(s) {missing}; it has "
                                 f"{sorted(data)}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown ESM config key(s): %s", unknown)
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ESMFormatError(f"ESM format version {version} is newer than this stepstone "
                                 f"supports ({FORMAT_VERSION}); upgrade stepstone.")
        return cls(**{k: v for k, v in data.items() if k in known})


def _versions() -> dict[str, str]:
    import transformers

    from stepstone.esm import __version__

    return {"stepstone": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


class EmbeddingSpaceMap(nn.Module):
    """Map base-encoder embeddings to a fine-tuned encoder's space.

    Architectures: ``linear`` (d→d affine, the paper's choice), ``lowrank``
    (``x + U V x + b``, a residual of rank ``rank``) and ``mlp``
    (``Linear → GELU → Linear``, hidden ``hidden_dim``).

    Parameters
    ----------
    config : ESMConfig
    """

    def __init__(self, config: ESMConfig) -> None:
        super().__init__()
        self.config = config
        d_in, d_out = config.in_dim, config.out_dim
        if config.architecture == "linear":
            self.linear = nn.Linear(d_in, d_out)
        elif config.architecture == "lowrank":
            self.down = nn.Linear(d_in, config.rank, bias=False)
            self.up = nn.Linear(config.rank, d_out)
            nn.init.zeros_(self.up.weight)  # start at the identity map
        else:
            self.net = nn.Sequential(nn.Linear(d_in, config.hidden_dim), nn.GELU(),
                                     nn.Linear(config.hidden_dim, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, in_dim) → (batch, out_dim)."""
        arch = self.config.architecture
        if arch == "linear":
            return self.linear(x)
        if arch == "lowrank":
            return x + self.up(self.down(x))
        return self.net(x)

    def affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(W, b)`` in float64 with ``ESM(x) = W x + b``, or None for non-affine maps.

        Affine maps let ESM-LogME score from the target's shared decomposition
        without materialising the mapped embeddings.
        """
        arch = self.config.architecture
        with torch.no_grad():
            if arch == "linear":
                w, b = self.linear.weight, self.linear.bias
            elif arch == "lowrank":
                w = torch.eye(self.config.in_dim) + self.up.weight @ self.down.weight
                b = self.up.bias
            else:
                return None
            return w.double().numpy().copy(), b.double().numpy().copy()

    @torch.no_grad()
    def transform(self, X: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
        """Apply the map to ``X`` of shape (n, in_dim); returns float32 (n, out_dim)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.config.in_dim:
            raise EncoderMismatchError(
                f"ESM {self.config.task_id!r} expects embeddings of shape (n, "
                f"{self.config.in_dim}); got {X.shape}."
            )
        self.eval()
        parts = [self(torch.from_numpy(X[i:i + batch_size])).numpy()
                 for i in range(0, len(X), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.config.out_dim), np.float32)

    # -- persistence ------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not self.config.versions:
            self.config.versions = _versions()
        if not self.config.created:
            self.config.created = datetime.now(UTC).isoformat(timespec="seconds")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        # Same bytes as save_file, but written like every other file (0644 under the
        # usual umask; save_file makes 0600).
        (directory / WEIGHTS_NAME).write_bytes(save(state, metadata={"format": "pt"}))
        (directory / CONFIG_NAME).write_text(
            json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, encoder: EncoderIdentity | None = None
             ) -> EmbeddingSpaceMap:
        """Load an ESM folder; with ``encoder``, refuse one made for another encoder."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).exists():
                raise ESMFormatError(f"ESM folder {str(directory)!r} has no {name}.")
        try:
            data = json.loads((directory / CONFIG_NAME).read_text())
        except json.JSONDecodeError as err:
            raise ESMFormatError(f"{directory / CONFIG_NAME} is not valid JSON: {err}") from None
        config = ESMConfig.from_dict(data)
        if encoder is not None:
            check_encoder(config, encoder)
        esm = cls(config)
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except SafetensorError as err:
            raise ESMFormatError(f"{directory / WEIGHTS_NAME} is not readable safetensors "
                                 f"({err}).") from None
        expected = set(esm.state_dict())
        if set(state) != expected:
            raise ESMFormatError(
                f"{directory / WEIGHTS_NAME} holds tensors {sorted(state)}; a "
                f"{config.architecture} ESM needs {sorted(expected)}."
            )
        esm.load_state_dict(state)
        return esm.eval()


def check_encoder(config: ESMConfig, encoder: EncoderIdentity) -> None:
    """Refuse an ESM trained for another encoder, pooling, max length, layer or dim
    (the rule is :meth:`EncoderIdentity.mismatches`)."""
    encoder.check_matches(config.encoder_identity, what=f"ESM {config.task_id!r}")


@dataclass
class FitResult:
    """Train and validation MSE of an ESM fit, next to the identity map's.

    ``shift_captured``: the share of the fine-tuning shift ``tuned - base`` that the
    map explains on the held-out pairs, ``1 - val_mse / identity_val_mse`` (negative:
    worse than leaving the embeddings unchanged). Identity fields are None when the
    dims differ or no pairs were held out.
    """

    train_mse: float
    val_mse: float | None
    epochs: int
    num_pairs: int
    identity_val_mse: float | None = None
    alpha: float | None = None

    @property
    def shift_captured(self) -> float | None:
        if self.val_mse is None or not self.identity_val_mse:
            return None
        return 1.0 - self.val_mse / self.identity_val_mse

    def metrics(self) -> dict[str, float]:
        """The numbers recorded in an ESM's ``config.metrics``."""
        out = {"train_mse": self.train_mse}
        if self.val_mse is not None:
            out["val_mse"] = self.val_mse
        if self.identity_val_mse is not None:
            out["identity_val_mse"] = self.identity_val_mse
            out["shift_captured"] = self.shift_captured
        return out


def fit_esm(
    base: np.ndarray,
    tuned: np.ndarray,
    *,
    architecture: Architecture = "linear",
    rank: int | None = None,
    hidden_dim: int | None = None,
    settings: ESMFitSettings | None = None,
    config: ESMConfig | None = None,
) -> tuple[EmbeddingSpaceMap, FitResult]:
    """Fit an ESM on (base, tuned) embedding pairs (see :class:`ESMFitSettings`).

    Parameters
    ----------
    base : float array of shape (n, d_in)
        Source texts under the base encoder.
    tuned : float array of shape (n, d_out)
        The same texts under the fine-tuned encoder.
    config : ESMConfig, optional
        Provenance to store; its architecture/dims are overwritten by the arguments.

    Returns
    -------
    (esm, result): the fitted map (eval mode) and its train/validation MSE next to the
    identity map's, which are also recorded in ``esm.config.fit``/``metrics``. With
    ``ridge`` the validation numbers are those of the fit on the training pairs, with
    which the strength was chosen; the returned map is then refitted on all pairs.
    """
    settings = settings or ESMFitSettings()
    base = np.asarray(base, dtype=np.float32)
    tuned = np.asarray(tuned, dtype=np.float32)
    if base.ndim != 2 or tuned.ndim != 2 or len(base) != len(tuned):
        raise ValueError(f"Need base (n, d_in) and tuned (n, d_out) with the same n; got "
                         f"{base.shape} and {tuned.shape}.")
    if len(base) < 2:
        raise ValueError(f"Need at least 2 embedding pairs to fit an ESM; got {len(base)}.")
    if not (np.isfinite(base).all() and np.isfinite(tuned).all()):
        raise ValueError("Embeddings contain NaN or inf; cannot fit an ESM.")
    if settings.method == "ridge" and architecture == "mlp":
        raise ConfigError("An mlp ESM has no closed-form fit; use method 'adamw' for it.")
    config = dataclasses.replace(config) if config is not None else ESMConfig()
    config.architecture, config.in_dim, config.out_dim = architecture, base.shape[1], tuned.shape[1]
    config.rank = rank if architecture == "lowrank" else None
    config.hidden_dim = hidden_dim if architecture == "mlp" else None
    if architecture == "lowrank" and rank is None:
        config.rank = 32
    if architecture == "mlp" and hidden_dim is None:
        config.hidden_dim = 512
    config.__post_init__()

    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    esm = EmbeddingSpaceMap(config)
    n = len(base)
    perm = torch.randperm(n, generator=gen).numpy()
    n_val = int(math.floor(n * settings.val_fraction)) if n >= 10 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    alpha = None
    if settings.method == "ridge":
        alpha = _fit_ridge(esm, base, tuned, train_idx, val_idx, settings.alpha)
    else:
        _fit_adamw(esm, base, tuned, train_idx, gen, settings)
    esm.eval()
    train_mse = _mse(esm, base[train_idx], tuned[train_idx])
    val_mse = identity_val = None
    if n_val:
        val_mse = _mse(esm, base[val_idx], tuned[val_idx])
        if config.in_dim == config.out_dim:
            diff = tuned[val_idx].astype(np.float64) - base[val_idx]
            identity_val = float(np.mean(diff ** 2))
    if settings.method == "ridge" and n_val:
        _fit_ridge(esm, base, tuned, perm, val_idx[:0], alpha)  # refit on all pairs
        esm.eval()
    result = FitResult(train_mse, val_mse, settings.epochs if settings.method == "adamw" else 0,
                       n, identity_val, alpha)
    config.fit = settings.key_dict()
    if alpha is not None:
        config.fit["alpha_chosen"] = alpha
    config.metrics = result.metrics()
    return esm, result


def _mse(esm: EmbeddingSpaceMap, X: np.ndarray, Y: np.ndarray) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(esm(torch.from_numpy(X)), torch.from_numpy(Y)))


def _fit_adamw(esm: EmbeddingSpaceMap, base: np.ndarray, tuned: np.ndarray,
               train_idx: np.ndarray, gen: torch.Generator, settings: ESMFitSettings) -> None:
    """The paper's fit: MSE, mini-batch AdamW, a fixed number of epochs."""
    X, Y = torch.from_numpy(base), torch.from_numpy(tuned)
    opt = torch.optim.AdamW(esm.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    esm.train()
    for _ in range(settings.epochs):
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            loss = nn.functional.mse_loss(esm(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _fit_ridge(esm: EmbeddingSpaceMap, base: np.ndarray, tuned: np.ndarray,
               train_idx: np.ndarray, val_idx: np.ndarray, alpha: float | None) -> float:
    """Closed-form ridge towards the identity map (towards zero when the dims differ):

        W = argmin ||Yc - Xc W^T||^2 + a ||W - W0||^2,   b = mean(Y) - W mean(X),

    over the centred training pairs, ``a = alpha * mean eigenvalue of Xc^T Xc``. With
    ``alpha`` None it is chosen from :data:`RIDGE_GRID` by MSE on ``val_idx``. A
    ``lowrank`` ESM gets the reduced-rank solution (Izenman 1975): the ridge residual
    ``W - I`` projected on the top principal directions of its fitted values. Sets the
    weights of ``esm`` and returns the relative strength used (float64 throughout).
    """
    cfg = esm.config
    X, Y = base[train_idx].astype(np.float64), tuned[train_idx].astype(np.float64)
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    lam, Q = np.linalg.eigh(Xc.T @ Xc)
    lam = np.clip(lam, 0.0, None)
    scale = max(float(lam.mean()), 1e-12)
    W0 = np.eye(cfg.in_dim) if cfg.in_dim == cfg.out_dim else np.zeros((cfg.out_dim, cfg.in_dim))
    rotated, rotated_prior = Q.T @ (Xc.T @ Yc), Q.T @ W0.T

    def solve(a: float) -> tuple[np.ndarray, np.ndarray]:
        Wt = Q @ ((rotated + a * scale * rotated_prior) / (lam + a * scale)[:, None])
        W = Wt.T
        if cfg.architecture == "lowrank":
            R = W - np.eye(cfg.in_dim)
            _, _, Vt = np.linalg.svd(Xc @ R.T, full_matrices=False)
            Vr = Vt[:cfg.rank].T  # (d, r)
            W = np.eye(cfg.in_dim) + Vr @ (Vr.T @ R)
        return W, my - W @ mx

    if alpha is None:
        if not len(val_idx):
            raise ValueError("Choosing the ridge strength needs held-out pairs (val_fraction > 0 "
                             "and at least 10 pairs); or give 'alpha'.")
        Xv, Yv = base[val_idx].astype(np.float64), tuned[val_idx].astype(np.float64)
        errors = []
        for a in RIDGE_GRID:
            W, b = solve(a)
            errors.append(float(np.mean((Xv @ W.T + b - Yv) ** 2)))
        alpha = RIDGE_GRID[int(np.argmin(errors))]
    W, b = solve(alpha)
    with torch.no_grad():
        if cfg.architecture == "linear":
            esm.linear.weight.copy_(torch.from_numpy(W))
            esm.linear.bias.copy_(torch.from_numpy(b))
        else:  # lowrank: x + up(down(x)) with up = V_r, down = V_r^T (W - I)
            R = W - np.eye(cfg.in_dim)
            U, S, Vt = np.linalg.svd(R)
            esm.up.weight.copy_(torch.from_numpy(U[:, :cfg.rank] * S[:cfg.rank]))
            esm.down.weight.copy_(torch.from_numpy(Vt[:cfg.rank]))
            esm.up.bias.copy_(torch.from_numpy(b))
    return float(alpha)
