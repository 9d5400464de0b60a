"""``rank``: order a registry's sources for a target, and the ``Ranking`` result."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepstone.esm.cache import EmbeddingCache
from stepstone.esm.data import Task
from stepstone.esm.encoder import DEFAULT_ENCODER, Encoder, load_encoder
from stepstone.esm.errors import ConfigError
from stepstone.esm.registry import Registry, RegistryEntry, open_registry
from stepstone.esm.specs import load_task
from stepstone.selection.index import task_index
from stepstone.selection.scorers import Scorer, check_label_kind, check_options, get_scorer
from stepstone.selection.target import Target

logger = logging.getLogger(__name__)

DEFAULT_MAX_TARGET = 1000
DEFAULT_EXIT_THRESHOLD = 0.98


@dataclass
class RankedSource:
    """One row of a ranking."""

    rank: int
    esm_id: str
    task_id: str
    score: float
    num_examples: int
    label_kind: str


@dataclass
class Ranking:
    """Sources ordered by score for one target.

    Attributes
    ----------
    rows : list of RankedSource, best first
    errors : dict
        ESM id → why it could not be scored (it is left out of ``rows``).
    reference : float or None
        LogME of the target's base embeddings: the "no intermediate step" level
        that ESM-LogME scores can be compared against.
    settings, timings : dict
        The run's options and seconds per stage.
    target_labels : dict
        The target's label kind, class count and the rule that decided the kind
        (:meth:`stepstone.esm.data.Task.label_info`), so a wrong inference shows.
    """

    target: str
    method: str
    rows: list[RankedSource]
    errors: dict[str, str] = field(default_factory=dict)
    reference: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    target_labels: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = [r.score for r in self.rows]
        if any(not np.isfinite(s) for s in scores):
            raise ValueError("A Ranking holds only finite scores; failures go to 'errors'.")
        if scores != sorted(scores, reverse=True):
            raise ValueError("Ranking rows must be sorted by score, best first.")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def task_ids(self) -> list[str]:
        return [r.task_id for r in self.rows]

    def to_pandas(self):
        import pandas as pd

        cols = ["rank", "esm_id", "task_id", "score", "num_examples", "label_kind"]
        return pd.DataFrame([r.__dict__ for r in self.rows], columns=cols)

    def to_csv(self, path: str | Path) -> Path:
        """The :meth:`to_pandas` table written to ``path`` (its folder is created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_pandas().to_csv(path, index=False)
        return path

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "method": self.method,
                "ranking": [r.__dict__ for r in self.rows], "errors": self.errors,
                "reference_base_logme": self.reference, "settings": self.settings,
                "timings": self.timings, "target_labels": self.target_labels}

    def __str__(self) -> str:
        head = f"Ranking of {len(self.rows)} sources for {self.target} by {self.method}"
        lines = [head]
        if self.target_labels:
            t = self.target_labels
            kind = t["kind"] + (f", {t['num_classes']} classes" if t["kind"] ==
                                "classification" else "")
            lines.append(f"target labels: {kind} ({t['rule']})")
        lines.append(f"{'rank':>4}  {'task':<24} {'score':>10}  {'size':>6}  kind")
        lines += [f"{r.rank:>4}  {r.task_id:<24} {r.score:>10.4f}  {r.num_examples:>6}  "
                  f"{r.label_kind}" for r in self.rows]
        if self.reference is not None:
            lines.append(f"      {'(no intermediate step)':<24} {self.reference:>10.4f}")
        if self.errors:
            lines.append(f"{len(self.errors)} source(s) could not be scored: "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.errors.items())[:5]))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Horizontal bar chart of the scores (best on top), written to ``path`` (its
        folder is created)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows[::-1]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
        # Bars start just left of the lowest value: LogME evidences are often negative,
        # and bars drawn from 0 would make the worst source the longest.
        values = [r.score for r in rows] + ([self.reference] if self.reference is not None
                                            else [])
        span = (max(values) - min(values)) or 1.0
        left = min(values) - 0.05 * span
        ax.barh([r.task_id for r in rows], [r.score - left for r in rows], left=left,
                color="#4477aa")
        ax.set_xlim(left, max(values) + 0.05 * span)
        if self.reference is not None:
            ax.axvline(self.reference, color="#cc3311", ls="--", lw=1,
                       label="base LogME (no intermediate step)")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(f"{self.method} score")
        ax.set_title(f"Source ranking for {self.target}")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def prepare_target(
    task: Task,
    encoder: Encoder,
    *,
    max_examples: int | None = DEFAULT_MAX_TARGET,
    cache: EmbeddingCache | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Target:
    """Embed the target's (capped, stratified) training split once."""
    capped = task.subsample(max_train=max_examples, seed=seed)
    inputs = capped.train.inputs()
    X = encoder.embed(inputs, cache=cache, progress=progress)
    texts = [t if isinstance(t, str) else f"{t[0]} {t[1]}" for t in inputs]
    return Target(task.task_id, X, capped.train.labels, task.label_kind, texts,
                  encoder.identity)


def _candidates(registry: Registry, target: Target, *, exclude_target: bool
                ) -> tuple[list[RegistryEntry], int]:
    entries = registry.entries()
    matching = [e for e in entries if e.encoder_identity.matches(target.encoder)]
    if exclude_target:
        matching = [e for e in matching if e.task_id != target.task_id]
    return matching, len(entries) - len(matching)


def _auto_layer(reg: Registry, task: Task, full: Encoder, threshold: float) -> int | None:
    """The adaptive exit layer, rounded up to one the registry has ESMs for."""
    known = reg.encoders()
    name = full.name
    sample = task.train.take(range(min(64, len(task.train)))).inputs()
    wanted = full.choose_exit_layer(sample, threshold=threshold)
    layers = sorted({k.layer or full.num_layers for k in known if k.name == name})
    chosen = next((k for k in layers if k >= wanted), full.num_layers)
    logger.info("Adaptive early exit: layer %d (registry has %s).", chosen, layers)
    return None if chosen >= full.num_layers else chosen


def _checked_scorer(method: str, *, approx_rank: int | None, prefilter: int | None,
                    layer: int | str | None, scorer_options: dict[str, Any] | None) -> Scorer:
    """The scorer for ``method``, after refusing every option it does not take."""
    options = dict(scorer_options or {})
    check_options(method, options, rank=False)
    check_options(method, [name for name, value in (("approx_rank", approx_rank),
                                                    ("prefilter", prefilter), ("layer", layer))
                           if value is not None])
    if approx_rank is not None:
        if "approx_rank" in options:
            raise ConfigError("'approx_rank' is given twice: as an argument and in "
                              "'scorer_options'.")
        options["approx_rank"] = approx_rank
    return get_scorer(method, **options)


def _at_least(name: str, value: Any, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                              or value < minimum):
        raise ConfigError(f"'{name}' must be an int >= {minimum} or None; got {value!r}.")


def _check_rank_options(*, top, prefilter, layer, max_examples, exit_threshold, encoder,
                        pooling, max_length, target, task_options) -> None:
    """Refuse invalid values and options that do not apply, before any work."""
    _at_least("top", top, 1)
    _at_least("prefilter", prefilter, 1)
    _at_least("max_examples", max_examples, 2)
    if layer != "auto":
        _at_least("layer", layer, 1)
    if exit_threshold is not None and layer != "auto":
        raise ConfigError(f"'exit_threshold' applies only with layer='auto'; got layer={layer!r}.")
    if isinstance(encoder, Encoder):
        given = [name for name, value in (("pooling", pooling), ("max_length", max_length))
                 if value is not None]
        if given:
            raise ConfigError(f"{given[0]!r} applies to an encoder given by name; got a loaded "
                              f"Encoder (set it in load_encoder).")
    if task_options and not isinstance(target, str):
        raise ConfigError("'task_options' apply to a target given by name or path; got a "
                          f"loaded {type(target).__name__}.")


def rank(
    target: str | Task,
    registry: str | Path | Registry | None = None,
    method: str = "esm-logme",
    *,
    encoder: Encoder | str | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    top: int | None = None,
    prefilter: int | None = None,
    approx_rank: int | None = None,
    layer: int | str | None = None,
    exit_threshold: float | None = None,
    max_examples: int | None = DEFAULT_MAX_TARGET,
    cache: EmbeddingCache | bool = True,
    exclude_target: bool = True,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
    scorer_options: dict[str, Any] | None = None,
) -> Ranking:
    """Rank a registry's sources for ``target``.

    Parameters
    ----------
    target : str or Task
        ``builtin:ID``, a local file (with ``task_options`` such as ``text_column``),
        a Hub dataset name, or a loaded :class:`~stepstone.esm.data.Task`.
    registry : path, Registry or None
        None means the registry shipped with stepstone.
    method : str
        One of :data:`stepstone.selection.scorers.METHODS` (or a registered method).
    encoder : Encoder, str or None
        Defaults to the encoder the registry was built with.
    pooling, max_length : optional
        For an encoder given by name; default to the registry's.
    top : int, optional
        Keep the best ``top`` rows (>= 1).
    prefilter : int, optional
        Score only the ``prefilter`` sources nearest to the target in the FAISS task
        index (TextEmb similarity), then rank those by ``method``.
    approx_rank : int, optional
        ESM-LogME approximation: keep the target's top principal directions.
    layer : int, 'auto' or None
        Early exit (after Kang et al. 2021): embed with the first ``layer`` encoder
        layers; only ESMs trained on that layer's embeddings match. ``'auto'`` picks
        the first layer whose pooled output stops changing (cosine to the next layer
        >= ``exit_threshold``, default 0.98, on up to 64 target texts), rounded up to a
        layer the registry has ESMs for.
    max_examples : int, optional
        Cap on target training examples used (stratified; >= 2).
    scorer_options : dict, optional
        The method's own options (``k`` for knn, ``seed`` for random, ...).

    Options a method does not take (see each scorer's ``options``) are refused before
    any work, as are invalid values.

    Raises
    ------
    ConfigError
        For an option the method does not take, an invalid value, or a target whose
        label kind the method cannot score, before anything is embedded.
    EncoderMismatchError
        When the registry holds no ESM for the requested encoder (both are named).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    scorer = _checked_scorer(method, approx_rank=approx_rank, prefilter=prefilter, layer=layer,
                             scorer_options=scorer_options)
    _check_rank_options(top=top, prefilter=prefilter, layer=layer, max_examples=max_examples,
                        exit_threshold=exit_threshold, encoder=encoder, pooling=pooling,
                        max_length=max_length, target=target, task_options=task_options)
    reg = registry if isinstance(registry, Registry) else open_registry(registry)
    task = load_task(target, **(task_options or {})) if isinstance(target, str) else target
    check_label_kind(method, task.label_kind)
    if encoder is None or isinstance(encoder, str):
        # Default to the registry's encoder configuration (name, pooling, max length).
        known = reg.encoders()
        name = encoder or (known[0].name if known else DEFAULT_ENCODER)
        match = next((k for k in known if k.name == name), None)
        encoder = load_encoder(
            name, pooling=pooling or (match.pooling if match else None),
            max_length=max_length or (match.max_length if match else None))
    if layer == "auto":
        layer = _auto_layer(reg, task, encoder, DEFAULT_EXIT_THRESHOLD if exit_threshold is None
                            else exit_threshold)
    if layer is not None and encoder.layer != layer:
        encoder = encoder.with_layer(layer)
    timings["load"] = time.perf_counter() - t0
    reg.check_encoder(encoder.identity)
    t1 = time.perf_counter()
    # Not `cache or None`: an EmbeddingCache has a length, and an empty one is falsy.
    emb_cache = EmbeddingCache() if cache is True else (
        cache if isinstance(cache, EmbeddingCache) else None)
    prepared = prepare_target(task, encoder, max_examples=max_examples, cache=emb_cache,
                              progress=progress)
    timings["embed"] = time.perf_counter() - t1
    entries, other_encoder = _candidates(reg, prepared, exclude_target=exclude_target)
    t2 = time.perf_counter()
    if prefilter is not None:
        keep = {esm_id for esm_id, _ in task_index(reg).search(prepared.mean_vector,
                                                               prefilter + 1)}
        entries = [e for e in entries if e.id in keep][:prefilter]
    timings["prefilter"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    scores = scorer.score(prepared, reg, entries, progress=progress)
    timings["score"] = time.perf_counter() - t3
    reference = prepared.base_logme() if "logme" in method else None
    by_id = {e.id: e for e in entries}
    ordered = sorted(scores.values.items(), key=lambda kv: (-kv[1], by_id[kv[0]].task_id))
    if top is not None:
        ordered = ordered[:top]
    rows = [RankedSource(i + 1, esm_id, by_id[esm_id].task_id, float(s),
                         by_id[esm_id].num_examples, by_id[esm_id].label_kind)
            for i, (esm_id, s) in enumerate(ordered)]
    timings["total"] = time.perf_counter() - t0
    settings = {
        "registry": str(reg.path), "encoder": encoder.name, "pooling": encoder.pooling,
        "max_length": encoder.max_length, "layer": encoder.layer,
        "target_examples": prepared.n, "candidates": len(entries), "prefilter": prefilter,
        "skipped_other_encoder": other_encoder, "exclude_target": exclude_target,
        **scorer.settings(),
    }
    return Ranking(task.task_id, method, rows, scores.errors, reference, settings,
                   {k: round(v, 4) for k, v in timings.items()}, task.label_info())
