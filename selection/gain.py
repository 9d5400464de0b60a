"""Predicted transfer gain with a prediction interval, and the recommendation.

A ranking always puts something first; this module says whether the first is worth
the intermediate step. A small ridge model maps a few cheap per-(source, target)
signals to the gain in target metric points over fine-tuning on the target alone,
and a split-conformal interval around it is calibrated on held-out *targets*:

    features(S, T) = [ESM-LogME(S, T) - LogME_base(T),          # You et al. 2021;
                      z-score of ESM-LogME(S, T) among T's sources,   Schulte et al. 2024
                      TextEmb cosine(S, T),                      # Vu et al. 2020
                      log10(number of S's training examples)]
    gain(S, T) ≈ intercept + coef · standardised features        (points, e.g. accuracy x 100)
    interval   = [pred + q_lo, pred + q_hi], q = quantiles of leave-one-target-out
                 residuals (every residual comes from a model that never saw its target)

The recommendation is the source with the largest predicted gain when that gain is
above ``min_gain`` (default 0), else "no intermediate step".

The coefficients live in a JSON file (:data:`DEFAULT_GAIN_MODEL`, shipped with the
package) that records the transfer matrix it was fitted on (protocol key and a
fingerprint of the file) and the encoder it is valid for; :func:`fit_gain_model`
refits one from any matrix (``stepstone gain fit``), and
:func:`loto_predictions` gives the leave-one-target-out predictions the benchmarks
score. No target's own cells ever reach the model that predicts it: every fitted
model records the targets it used (``targets_``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stepstone.esm.errors import ConfigError, StepstoneError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: The model fitted on the committed v1 transfer matrix, shipped with the package.
DEFAULT_GAIN_MODEL = Path(__file__).resolve().parent / "gain_model.json"
FEATURES: tuple[str, ...] = ("delta_logme", "z_logme", "textemb", "log10_source_examples")
DEFAULT_ALPHA = 1.0   # ridge penalty on standardised features (the intercept is free)
DEFAULT_LEVEL = 0.8   # nominal coverage of the prediction interval
#: the ranking method whose scores the features are built from
FEATURE_METHOD = "esm-logme"


class GainModelError(StepstoneError):
    """A gain model file that cannot be read, or a fit without enough data."""


class NoSourceRecommended(StepstoneError):
    """``--source auto`` declined: the gain model expects no source to help."""


# -- features ---------------------------------------------------------------------------
def gain_features(esm_logme: dict[str, float], reference: float, *,
                  textemb: dict[str, float], num_examples: dict[str, int]
                  ) -> dict[str, dict[str, float]]:
    """Per-source feature dicts for one target.

    esm_logme: source -> ESM-LogME score on the target; reference: the target's base
    LogME (no intermediate step); textemb: source -> TextEmb cosine; num_examples:
    source -> training examples its ESM was fitted on. The z-score is taken over the
    sources given (all the target's candidates), so pass the whole candidate set.
    """
    if not esm_logme:
        return {}
    values = np.array(list(esm_logme.values()), dtype=np.float64)
    mu, sd = float(values.mean()), float(values.std())
    out = {}
    for s, v in esm_logme.items():
        out[s] = {"delta_logme": float(v - reference),
                  "z_logme": float((v - mu) / sd) if sd > 0 else 0.0,
                  "textemb": float(textemb[s]),
                  "log10_source_examples": float(math.log10(max(num_examples[s], 1)))}
    return out


@dataclasses.dataclass(frozen=True)
class GainCell:
    """One (source, target) pair: its features and, for training, its measured gain
    in points (100 x metric difference to the no-intermediate-step baseline)."""

    target: str
    source: str
    features: dict[str, float]
    gain: float | None = None


def cells_from_scores(scores: dict[str, dict[str, Any]],
                      gains: dict[str, dict[str, float]] | None = None) -> list[GainCell]:
    """Cells from per-target score records (the scores file ``stepstone gain fit``
    writes): ``{target: {"esm_logme": {src: s}, "reference": r, "textemb": {src: c},
    "num_examples": {src: n}}}``; ``gains[target][source]`` in points where measured
    (cells without a measured gain are left out when ``gains`` is given)."""
    cells = []
    for t in sorted(scores):
        rec = scores[t]
        feats = gain_features(rec["esm_logme"], rec["reference"], textemb=rec["textemb"],
                              num_examples=rec["num_examples"])
        for s in sorted(feats):
            if gains is None:
                cells.append(GainCell(t, s, feats[s]))
            elif s in gains.get(t, {}):
                cells.append(GainCell(t, s, feats[s], float(gains[t][s])))
    return cells


# -- the model ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GainPrediction:
    """Predicted gain of one source, in points, with its interval at ``level``."""

    gain: float
    low: float
    high: float
    level: float


@dataclasses.dataclass
class GainModel:
    """Ridge regression of transfer gain (points) on :data:`FEATURES`, with a
    split-conformal interval from leave-one-target-out residuals.

    Learned state (scikit-learn style, trailing ``_``): ``mean_``/``scale_`` (feature
    standardisation), ``coef_`` (points per standard deviation), ``intercept_``,
    ``residual_quantiles_`` (the interval's offsets around the prediction),
    ``targets_``/``sources_`` (what the fit saw), ``n_cells_``, ``loto_rmse_``.
    ``meta`` records the matrix (protocol key, fingerprint, metric) and the encoder
    the model is valid for.
    """

    features: tuple[str, ...] = FEATURES
    alpha: float = DEFAULT_ALPHA
    level: float = DEFAULT_LEVEL
    mean_: list[float] = dataclasses.field(default_factory=list)
    scale_: list[float] = dataclasses.field(default_factory=list)
    coef_: list[float] = dataclasses.field(default_factory=list)
    intercept_: float = 0.0
    residual_quantiles_: tuple[float, float] = (float("nan"), float("nan"))
    targets_: list[str] = dataclasses.field(default_factory=list)
    sources_: list[str] = dataclasses.field(default_factory=list)
    n_cells_: int = 0
    loto_rmse_: float = float("nan")
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ConfigError(f"'features' must be among {list(FEATURES)}; got {unknown}.")
        if not 0 < self.level < 1:
            raise ConfigError(f"'level' must be in (0, 1); got {self.level!r}.")
        if not self.alpha >= 0:
            raise ConfigError(f"'alpha' must be >= 0; got {self.alpha!r}.")
        self.residual_quantiles_ = tuple(self.residual_quantiles_)

    # -- fitting ---------------------------------------------------------------------
    def _matrix(self, cells: Sequence[GainCell]) -> np.ndarray:
        return np.array([[c.features[f] for f in self.features] for c in cells],
                        dtype=np.float64).reshape(len(cells), len(self.features))

    def _fit_point(self, cells: Sequence[GainCell]) -> GainModel:
        """Coefficients only (no interval)."""
        X = self._matrix(cells)
        y = np.array([c.gain for c in cells], dtype=np.float64)
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale == 0] = 1.0
        Z = (X - mean) / scale
        yc = y - y.mean()
        coef = np.linalg.solve(Z.T @ Z + self.alpha * np.eye(Z.shape[1]), Z.T @ yc)
        self.mean_, self.scale_ = mean.tolist(), scale.tolist()
        self.coef_, self.intercept_ = coef.tolist(), float(y.mean())
        self.targets_ = sorted({c.target for c in cells})
        self.sources_ = sorted({c.source for c in cells})
        self.n_cells_ = len(cells)
        return self

    def fit(self, cells: Sequence[GainCell]) -> GainModel:
        """Fit on ``cells`` (each with a measured ``gain``); the interval comes from
        leave-one-target-out residuals among the cells' own targets (>= 3 targets)."""
        cells = list(cells)
        missing = [(c.source, c.target) for c in cells if c.gain is None
                   or not np.isfinite(c.gain)]
        if missing:
            raise GainModelError(f"Every training cell needs a measured gain; "
                                 f"{len(missing)} have none, e.g. {missing[0]}.")
        targets = sorted({c.target for c in cells})
        if len(targets) < 3:
            raise GainModelError(f"A gain model needs cells of >= 3 targets (its interval is "
                                 f"calibrated on held-out targets); got {targets}.")
        residuals = []
        for t in targets:
            inner = self._clone()._fit_point([c for c in cells if c.target != t])
            held = [c for c in cells if c.target == t]
            residuals += [c.gain - p for c, p in zip(held, inner.predict_array(held),
                                                     strict=True)]
        self._fit_point(cells)
        self.residual_quantiles_ = conformal_offsets(residuals, self.level)
        self.loto_rmse_ = float(np.sqrt(np.mean(np.square(residuals))))
        return self

    def _clone(self) -> GainModel:
        return GainModel(self.features, self.alpha, self.level, meta=dict(self.meta))

    # -- prediction ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if len(self.coef_) != len(self.features):
            raise GainModelError("The gain model is not fitted; call fit() or load one.")

    def predict_array(self, cells: Sequence[GainCell]) -> np.ndarray:
        """Point predictions (points), float array of shape (n_cells,)."""
        self._check_fitted()
        Z = (self._matrix(cells) - np.asarray(self.mean_)) / np.asarray(self.scale_)
        return self.intercept_ + Z @ np.asarray(self.coef_)

    def predict(self, features: dict[str, dict[str, float]]) -> dict[str, GainPrediction]:
        """source -> prediction, for one target's :func:`gain_features`."""
        cells = [GainCell("", s, f) for s, f in features.items()]
        if not cells:
            return {}
        lo, hi = self.residual_quantiles_
        return {c.source: GainPrediction(float(p), float(p + lo), float(p + hi), self.level)
                for c, p in zip(cells, self.predict_array(cells), strict=True)}

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        d["residual_quantiles_"] = list(self.residual_quantiles_)
        d["coefficients"] = dict(zip(self.features, self.coef_, strict=True))  # to read
        return {"format_version": FORMAT_VERSION, **d}

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (indent=2, sorted keys); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> GainModel:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise GainModelError(f"Cannot read the gain model {str(path)!r}: {err}") from err
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise GainModelError(f"{str(path)!r} is not a gain model of format "
                                 f"{FORMAT_VERSION}; got format "
                                 f"{d.get('format_version') if isinstance(d, dict) else d!r}.")
        d.pop("format_version")
        d.pop("coefficients", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            logger.warning("Gain model %s: ignoring unknown keys %s.", path, unknown)
        model = cls(**{k: v for k, v in d.items() if k in names})
        model._check_fitted()
        return model

    # -- applicability ---------------------------------------------------------------
    def mismatch(self, encoder: dict[str, Any], method: str) -> str | None:
        """Why the model does not apply to a ranking by ``method`` with ``encoder``
        (name, fingerprint, pooling, max_length, layer), or None when it does."""
        if method != FEATURE_METHOD:
            return (f"the gain model reads {FEATURE_METHOD} scores; this ranking is by "
                    f"{method!r}")
        want = self.meta.get("encoder", {})
        for key in ("name", "fingerprint", "pooling", "max_length", "layer"):
            if key in want and want[key] != encoder.get(key):
                return (f"the gain model was fitted for encoder {key} {want[key]!r}; this "
                        f"ranking's is {encoder.get(key)!r}")
        return None

    def __str__(self) -> str:
        m = self.meta
        lines = [f"Gain model (ridge alpha={self.alpha:g}) fitted on {len(self.targets_)} "
                 f"targets x {len(self.sources_)} sources ({self.n_cells_} cells) of "
                 f"matrix {m.get('matrix_file', '?')} (protocol {m.get('protocol_key', '?')}"
                 f", fingerprint {m.get('matrix_fingerprint', '?')}), metric "
                 f"{m.get('metric', '?')} in points",
                 f"{'intercept':<24} {self.intercept_:+8.3f}"]
        lines += [f"{f:<24} {c:+8.3f}  points per std (std {s:.4g})"
                  for f, c, s in zip(self.features, self.coef_, self.scale_, strict=True)]
        lo, hi = self.residual_quantiles_
        lines.append(f"{self.level:.0%} interval: prediction {lo:+.2f} / {hi:+.2f} points "
                     f"(leave-one-target-out residuals; RMSE {self.loto_rmse_:.2f})")
        return "\n".join(lines)


def conformal_offsets(residuals: Sequence[float], level: float) -> tuple[float, float]:
    """Split-conformal offsets (lo, hi) for a two-sided interval at ``level`` from
    held-out residuals (true - predicted): the finite-sample corrected
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (Lei et al. 2018)."""
    r = np.sort(np.asarray(residuals, dtype=np.float64))
    n = len(r)
    if n == 0:
        raise GainModelError("No held-out residuals to calibrate an interval on.")
    tail = (1 - level) / 2
    k_hi = min(n, math.ceil((n + 1) * (1 - tail))) - 1
    k_lo = max(1, math.floor((n + 1) * tail)) - 1
    return float(r[k_lo]), float(r[k_hi])


def fit_gain_model(cells: Sequence[GainCell], *, features: Sequence[str] = FEATURES,
                   alpha: float = DEFAULT_ALPHA, level: float = DEFAULT_LEVEL,
                   meta: dict[str, Any] | None = None) -> GainModel:
    """A :class:`GainModel` fitted on ``cells`` (one-off use of ``GainModel().fit``)."""
    return GainModel(tuple(features), alpha, level, meta=dict(meta or {})).fit(cells)


def loto_predictions(cells: Sequence[GainCell], *, features: Sequence[str] = FEATURES,
                     alpha: float = DEFAULT_ALPHA, level: float = DEFAULT_LEVEL,
                     ) -> dict[str, dict[str, Any]]:
    """Leave-one-target-out predictions: for each target T, a model fitted (and its
    interval calibrated) on the other targets' cells only predicts T's sources.

    Returns {target: {"predictions": {source: GainPrediction}, "gains": {source:
    measured gain}, "trained_on": the targets the model saw}} (``trained_on`` never
    holds the target; tests check it).
    """
    out = {}
    for t in sorted({c.target for c in cells}):
        train = [c for c in cells if c.target != t]
        model = fit_gain_model(train, features=features, alpha=alpha, level=level)
        held = [c for c in cells if c.target == t]
        out[t] = {"predictions": model.predict({c.source: c.features for c in held}),
                  "gains": {c.source: c.gain for c in held},
                  "trained_on": list(model.targets_)}
    return out


# -- the recommendation ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recommendation:
    """What to do for one target.

    kind: ``source`` (fine-tune on ``esm_id`` first), ``none`` (no source is expected
    to help: fine-tune on the target directly) or ``unavailable`` (no applicable gain
    model; ``reason`` says why, and the ranking stands alone).
    """

    kind: Literal["source", "none", "unavailable"]
    esm_id: str | None = None
    task_id: str | None = None
    prediction: GainPrediction | None = None
    min_gain: float = 0.0
    reason: str = ""
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: caveats: a target far from the calibration size, sources outside its pool
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("source", "none", "unavailable"):
            raise ConfigError(f"'kind' must be one of ['source', 'none', 'unavailable']; "
                              f"got {self.kind!r}.")
        if (self.kind == "source") != (self.esm_id is not None):
            raise ConfigError("A 'source' recommendation names an ESM; the others name none.")

    def __str__(self) -> str:
        if self.kind == "unavailable":
            return f"recommendation: none made ({self.reason}); ranking only"
        p = self.prediction
        notes = "".join(f"; {n}" for n in self.notes)
        if self.kind == "source":
            sure = "" if p.low > 0 else "; the interval includes no gain, so this is a " \
                "lean, not a promise"
            return (f"recommendation: use {self.task_id} ({self.esm_id}) first: expected "
                    f"{p.gain:+.2f} points, {p.level:.0%} interval [{p.low:+.2f}, "
                    f"{p.high:+.2f}]{sure}{notes}")
        best = f" (best: {self.task_id}, {p.gain:+.2f} points, {p.level:.0%} interval " \
               f"[{p.low:+.2f}, {p.high:+.2f}])" if p is not None else ""
        return ("recommendation: no source is expected to help; fine-tune on the target "
                f"directly{best}{notes}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        d["text"] = str(self)
        return d


def recommend(predictions: dict[str, GainPrediction], task_ids: dict[str, str], *,
              min_gain: float = 0.0, model: dict[str, Any] | None = None) -> Recommendation:
    """The source with the largest predicted gain if that gain exceeds ``min_gain``
    points, else "none" (ties: the smaller task id, then ESM id)."""
    if not predictions:
        return Recommendation("unavailable", reason="no source could be scored",
                              model=dict(model or {}))
    best = min(predictions, key=lambda s: (-predictions[s].gain, task_ids[s], s))
    p = predictions[best]
    if p.gain > min_gain:
        return Recommendation("source", best, task_ids[best], p, min_gain,
                              model=dict(model or {}))
    return Recommendation("none", None, task_ids[best], p, min_gain,
                          reason=f"the best predicted gain {p.gain:+.2f} is not above "
                                 f"{min_gain:+.2f} points", model=dict(model or {}))


def model_summary(model: GainModel) -> dict[str, Any]:
    """The few facts about a model a ranking records next to its recommendation."""
    m = model.meta
    return {"protocol_key": m.get("protocol_key"), "matrix_fingerprint":
            m.get("matrix_fingerprint"), "metric": m.get("metric"), "level": model.level,
            "targets": len(model.targets_), "target_max_train": m.get("target_max_train")}


def load_gain_model(path: str | Path | None = None) -> GainModel:
    """The gain model at ``path`` (default: the shipped :data:`DEFAULT_GAIN_MODEL`)."""
    return GainModel.load(DEFAULT_GAIN_MODEL if path is None else path)
