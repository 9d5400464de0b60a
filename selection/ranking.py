"""``rank``: order a registry's sources for a target, and the ``Ranking`` result."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepstone.esm.cache import EmbeddingCache
from stepstone.esm.data import Task
from stepstone.esm.encoder import (
    DEFAULT_ENCODER,
    Encoder,
    EncoderIdentity,
    EncoderMismatchError,
    load_encoder,
)
from stepstone.esm.errors import ConfigError, StepstoneError
from stepstone.esm.filters import CandidateFilter, filter_entries
from stepstone.esm.identity import same_encoder_name
from stepstone.esm.registry import Registry, RegistryEntry, open_registry
from stepstone.esm.sampling import sample_indices
from stepstone.esm.specs import load_task
from stepstone.selection.gain import (
    FEATURE_METHOD,
    GainModel,
    GainModelError,
    GainPrediction,
    Recommendation,
    gain_features,
    load_gain_model,
    model_summary,
    recommend,
)
from stepstone.selection.index import first_stage_ids
from stepstone.selection.scorers import Scorer, check_label_kind, check_options, get_scorer
from stepstone.selection.target import Target

logger = logging.getLogger(__name__)

DEFAULT_MAX_TARGET = 1000
SKIPPED_SHOWN = 10  # more skipped ESMs are summarised by reason (--json lists all)
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
    #: predicted gain over no intermediate step, in target metric points, and its
    #: interval (:mod:`stepstone.selection.gain`); None without an applicable gain model
    predicted_gain: float | None = None
    gain_low: float | None = None
    gain_high: float | None = None
    #: the same score as a neighbouring row (to within 1e-9): their order says nothing
    tied: bool = False


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
    skipped : dict
        ESM id → why it was not a candidate (the target's own data, another encoder,
        a candidate filter: ``'filtered out: <rule> (<value>)'``);
        every registry ESM is in ``rows``, ``errors`` or here (or was cut by ``top``
        or ``prefilter``).
    leakage : dict
        ESM id → texts its source shares with the target
        (:class:`stepstone.esm.leakage.Overlap` as a dict), or ``{'unknown': why}``.
    target_split : str
        Which rows the target's test split holds and how they were chosen; the ranking
        scores the training split.
    """

    target: str
    method: str
    rows: list[RankedSource]
    errors: dict[str, str] = field(default_factory=dict)
    reference: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    target_labels: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    leakage: dict[str, dict[str, Any]] = field(default_factory=dict)
    target_split: str = ""
    #: the gain model's verdict (use a source, or none); None when not asked for
    recommendation: Recommendation | None = None
    #: extra per-source signals the gain model read: {name: {ESM id: value}}
    signals: dict[str, dict[str, float]] = field(default_factory=dict)

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

        cols = ["rank", "esm_id", "task_id", "score", "tied", "num_examples", "label_kind"]
        if any(r.predicted_gain is not None for r in self.rows):
            cols += ["predicted_gain", "gain_low", "gain_high"]
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
                "timings": self.timings, "target_labels": self.target_labels,
                "skipped": self.skipped, "leakage": self.leakage,
                "target_split": self.target_split, "score_notes": self.score_notes(),
                "recommendation": None if self.recommendation is None
                else self.recommendation.to_dict()}

    def __str__(self) -> str:
        head = f"Ranking of {len(self.rows)} sources for {self.target} by {self.method}"
        lines = [head]
        if self.target_labels:
            t = self.target_labels
            kind = t["kind"] + (f", {t['num_classes']} classes" if t["kind"] ==
                                "classification" else "")
            lines.append(f"target labels: {kind} ({t['rule']})")
        d = _decimals(self)  # enough digits that untied neighbours never print alike
        table = [f"{'rank':>4}  {'task':<24} {'score':>{d + 6}}  {'size':>6}  kind"
                 + _gain_header(self)]
        table += [f"{_rank_cell(r):>4}  {r.task_id:<24} {r.score:>{d + 6}.{d}f}  "
                  f"{r.num_examples:>6}  {r.label_kind}" + _gain_cell(r) for r in self.rows]
        if self.reference is not None:
            table.append(f"      {'(no intermediate step)':<24} {self.reference:>{d + 6}.{d}f}")
        lines += table if self.method != "logme" else []  # no ranking: see score_notes
        if self.errors:
            lines.append(f"{len(self.errors)} source(s) could not be scored: "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.errors.items())[:5]))
        lines += self.score_notes()
        lines += self._footer_notes()
        if self.recommendation is not None:  # the verdict is the last line
            lines.append(str(self.recommendation))
        return "\n".join(lines)

    def score_notes(self) -> list[str]:
        """What the score and the "(no intermediate step)" line mean, whether any source
        beats that line, and what a tie mark means: one footer line each."""
        if self.method == "logme":
            return _reference_only(self)
        lines = [f"score: {score_meaning(self.method)}; higher = ranked first (compare "
                 "scores within one ranking only; the recommendation line, where shown, "
                 "turns them into a predicted gain)."]
        if self.reference is None:
            return lines + ([TIE_NOTE] if any(r.tied for r in self.rows) else [])
        lines.append("(no intermediate step): LogME of the target's own base embeddings, "
                     "i.e. fine-tuning on the target directly. A source above this line makes "
                     "the target's labels more separable in its space; on the benchmark "
                     "matrix that alone did not reliably mean a gain (see the "
                     "recommendation).")
        above = [r for r in self.rows if r.score > self.reference
                 and not np.isclose(r.score, self.reference, rtol=TIE_RTOL, atol=0)]
        if self.rows and not above:
            lines.append("No source scores above the no-intermediate step: by this score, "
                         "no intermediate step is expected to help; fine-tune on the target "
                         "directly.")
        elif above:
            best = above[0]
            lines.append(f"{len(above)} of {len(self.rows)} shown sources score above the "
                         f"no-intermediate step; the best, {best.task_id}, by "
                         f"{best.score - self.reference:+.3g}.")
        if any(r.tied for r in self.rows):
            lines.append(TIE_NOTE)
        return lines

    def _footer_notes(self) -> list[str]:
        """The target's split, skipped candidates and shared texts, one line each."""
        lines = []
        if self.target_split:
            lines.append(f"target split: scored on the training rows; test split: "
                         f"{self.target_split}")
        if len(self.skipped) > SKIPPED_SHOWN:
            lines.append(f"{len(self.skipped)} ESM(s) not ranked (each with its reason under "
                         "'skipped' in --json):")
            lines += [f"  {line}" for line in skipped_summary(self.skipped)]
        elif self.skipped:
            lines.append(f"{len(self.skipped)} ESM(s) not ranked:")
            lines += [f"  {esm_id}: {why}" for esm_id, why in self.skipped.items()]
        leaks = {k: v for k, v in self.leakage.items() if "unknown" not in v}
        if leaks:
            lines.append(f"WARNING: {len(leaks)} source(s) share texts with the target "
                         "(their scores and any transfer gain are inflated):")
            lines += [f"  {esm_id}: {_overlap_text(v)}" for esm_id, v in leaks.items()]
        unknown = [k for k, v in self.leakage.items() if "unknown" in v]
        if unknown:
            lines.append(f"shared texts not checked for {len(unknown)} source(s) whose data "
                         f"cannot be loaded here: {', '.join(unknown)}")
        return lines

    def plot(self, path: str | Path) -> Path:
        """Horizontal bars, best on top, written to ``path`` (its folder is created).

        With the no-intermediate reference (the LogME methods) a bar is the score minus
        that reference: zero, the dashed line, is "no intermediate step", and a bar's
        length is the source's margin over it. Without one, bars start at zero when no
        score is negative, else just left of the lowest. ``logme`` gives every source
        the same score: its plot is that one number. Tied rows are marked "(=)".
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        rows = self.rows[::-1]
        names = [r.task_id + (" (=)" if r.tied else "") for r in rows]
        single = self.method == "logme" and self.reference is not None
        fig, ax = plt.subplots(figsize=(7, 0.35 * (1 if single else len(rows)) + 1.9),
                               layout="constrained")
        if single:  # one number: a marked point, not a bar from an arbitrary origin
            ref = self.reference
            ax.plot([ref], [0], "o", color="#cc3311")
            ax.annotate(f"{ref:.4f}", (ref, 0), xytext=(0, 8), textcoords="offset points",
                        ha="center", fontsize=8)
            ax.set_yticks([0], ["(no intermediate step)"])
            ax.set_xlim(ref - 0.5 * (abs(ref) or 1), ref + 0.5 * (abs(ref) or 1))
            ax.set_xlabel("LogME of the target's base embeddings")
            ax.set_title(f"'logme' gives all {len(rows)} sources this one score: it ranks "
                         "nothing", fontsize=8, loc="left")
        elif self.reference is not None:
            diffs = [r.score - self.reference for r in rows]
            ax.barh(names, diffs, color=["#4477aa" if d > 0 else "#aaaaaa" for d in diffs])
            ax.axvline(0, color="#cc3311", ls="--", lw=1.2,
                       label=f"0 = no intermediate step (base LogME {self.reference:.4f})")
            for y, d in enumerate(diffs):
                ax.text(d, y, f" {d:+.2g} " if d else " 0 ", va="center", fontsize=7,
                        ha="left" if d >= 0 else "right")
            low, high = min([*diffs, 0.0]), max([*diffs, 0.0])
            span = (high - low) or 1e-6
            ax.set_xlim(low - (0.3 if low < 0 else 0.05) * span,
                        high + (0.3 if high > 0 else 0.05) * span)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.2g}" if v else "0"))
            ax.set_xlabel(f"{self.method} score − no intermediate step (> 0: expected to help)")
            fig.legend(loc="outside lower center", fontsize=8, frameon=False)
        else:
            values = [r.score for r in rows]
            span = (max(values) - min(values)) or 1.0
            # LogME-like scores can be negative: bars from 0 would make the worst longest.
            left = 0.0 if min(values) >= 0 else min(values) - 0.05 * span
            ax.barh(names, [v - left for v in values], left=left, color="#4477aa")
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.4g}", va="center", fontsize=7)
            ax.set_xlim(left, max(values) + 0.15 * (max(values) - left or 1.0))
            ax.set_xlabel(f"{self.method} score")
        fig.suptitle(f"Source ranking for {self.target} ({self.method})", fontsize=10)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def skipped_summary(skipped: dict[str, str], *, examples: int = 3) -> list[str]:
    """One line per kind of reason in ``Ranking.skipped`` (another encoder, the
    target's own data, each filter rule), most frequent first: how many, a few ids,
    and the first one's full reason."""
    groups: dict[str, list[str]] = {}
    for esm_id, why in skipped.items():
        kind = why.split(" (")[0] if why.startswith("filtered out") else \
            why.split(":")[0].split(" (")[0]
        groups.setdefault(kind, []).append(esm_id)
    lines = []
    for kind, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(ids[:examples]) + (", ..." if len(ids) > examples else "")
        lines.append(f"{len(ids)} {kind}: {shown} (e.g. {ids[0]}: {skipped[ids[0]]})")
    return lines


#: Ties: scores equal to within this relative tolerance share a rank mark ('=').
TIE_RTOL = 1e-9
TIE_NOTE = ("'=': tied with a neighbour (the same score to within 1e-9); tied rows are "
            "listed alphabetically, which is no preference.")
#: What each built-in method's score is, for the ranking's footer.
SCORE_MEANINGS = {
    "esm-logme": "LogME evidence (You et al. 2021) of the target labels given the target's "
                 "embeddings mapped by each source's ESM (Schulte et al. 2024), per example",
    "source-logme": "LogME evidence of the target labels given the embeddings of each "
                    "source's kept fine-tuned model, per example",
    "logme": "LogME evidence of the target labels given the target's base embeddings",
    "knn": "leave-one-out kNN accuracy on the target's embeddings mapped by each source's ESM",
    "textemb": "cosine similarity of the mean base embeddings of target and source "
               "(TextEmb, Vu et al. 2020)",
    "vocab": "share of the target's frequent words that the source's text also has",
    "kernel": "held-out target accuracy (minus MSE for regression) of the eNTK prediction "
              "with each source's kept model (Malladi et al. 2023)",
    "random": "a seeded random number (a floor for benchmarks, not a prediction)",
}


def score_meaning(method: str) -> str:
    """One phrase on what ``method``'s score measures (a registered method: the first
    line of its scorer's docstring)."""
    if method in SCORE_MEANINGS:
        return SCORE_MEANINGS[method]
    from stepstone.selection.scorers import scorer_class

    doc = (scorer_class(method).__doc__ or method).strip().splitlines()[0]
    return doc.rstrip(".")


def _tied(scores: list[float]) -> list[bool]:
    """For scores sorted best first: whether each equals a neighbour (:data:`TIE_RTOL`)."""
    same = [bool(np.isclose(a, b, rtol=TIE_RTOL, atol=0))
            for a, b in zip(scores, scores[1:], strict=False)]
    return [(i > 0 and same[i - 1]) or (i < len(same) and same[i]) for i in range(len(scores))]


def _rank_cell(row: RankedSource) -> str:
    return f"{row.rank}=" if row.tied else str(row.rank)


def _decimals(ranking: Ranking) -> int:
    """Decimals (4 to 10) at which untied neighbouring rows, and the best row and the
    reference, never print alike."""
    pairs = [(a.score, b.score) for a, b in zip(ranking.rows, ranking.rows[1:], strict=False)
             if not (a.tied and b.tied)]
    if ranking.reference is not None and ranking.rows:
        pairs.append((ranking.rows[0].score, ranking.reference))
    for d in range(4, 11):
        if all(f"{a:.{d}f}" != f"{b:.{d}f}" for a, b in pairs if a != b):
            return d
    return 10


def _reference_only(ranking: Ranking) -> list[str]:
    """``--method logme``: one number for the target, the same for every source."""
    if ranking.reference is None:
        return []
    return [f"LogME of the target's base embeddings (no intermediate step): "
            f"{ranking.reference:.4f}",
            f"Method 'logme' does not look at the sources: it gives all {len(ranking.rows)} "
            "the score above, so it ranks nothing. It is the reference the other LogME "
            "methods are compared with; rank with --method esm-logme to order the sources."]


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


def _gain_header(ranking: Ranking) -> str:
    rec = ranking.recommendation
    if rec is None or rec.kind == "unavailable":
        return ""
    level = rec.model.get("level")
    return f"{'':<8}  predicted gain, points [{level:.0%} interval]" if level else ""


def _gain_cell(row: RankedSource) -> str:
    if row.predicted_gain is None:
        return ""
    return (f"{'':<{max(0, 14 - len(row.label_kind))}}{row.predicted_gain:+6.2f} "
            f"[{row.gain_low:+6.2f}, {row.gain_high:+6.2f}]")


def _gain_model(gain: bool | str | Path | GainModel, *, method: str, encoder: Encoder
                ) -> tuple[GainModel | None, Recommendation | None]:
    """The gain model that applies to a ranking by ``method`` with ``encoder``, or None
    and the ``unavailable`` recommendation that says why (another method, encoder or
    protocol; an unreadable file)."""
    if method != FEATURE_METHOD:
        return None, Recommendation("unavailable", reason=(
            f"the gain model reads {FEATURE_METHOD} scores; this ranking is by {method!r}"))
    try:
        model = gain if isinstance(gain, GainModel) else load_gain_model(
            None if gain is True else gain)
    except GainModelError as err:
        return None, Recommendation("unavailable", reason=str(err))
    ident = encoder.identity
    why = model.mismatch({"name": ident.name, "fingerprint": ident.fingerprint,
                          "pooling": ident.pooling, "max_length": ident.max_length,
                          "layer": ident.layer}, method)
    if why is not None:
        return None, Recommendation("unavailable", reason=why, model=model_summary(model))
    return model, None


def _gain_sample(model: GainModel | None, prepared: Target) -> Target | None:
    """The stratified sample of the target the gain model's features are scored on, when
    the target is larger than the model's calibration targets (LogME evidence moves with
    the number of examples); else None. Drawn from the rows the ranking embedded (seed
    0), so nothing is embedded twice."""
    fitted_n = None if model is None else model_summary(model).get("target_max_train")
    if not fitted_n or prepared.n <= fitted_n:
        return None
    rows = sample_indices(prepared.labels, int(fitted_n), seed=0,
                          label_kind=prepared.label_kind)
    return Target(prepared.task_id, prepared.X[rows], prepared.labels[rows],
                  prepared.label_kind, [prepared.texts[i] for i in rows], prepared.encoder)


def _gains(model: GainModel | None, unavailable: Recommendation | None, *, method: str,
           reg: Registry, prepared: Target, entries: list[RegistryEntry],
           scores: dict[str, float], reference: float | None, scorer: Scorer,
           sample: Target | None, sample_scores: dict[str, float] | None, min_gain: float
           ) -> tuple[dict[str, dict[str, float]], dict[str, GainPrediction], Recommendation]:
    """The gain model's inputs, predictions and recommendation for one ranking
    (``model`` and ``unavailable`` from :func:`_gain_model`): a model that does not
    apply yields its ``unavailable`` recommendation, and no numbers.

    With a ``sample`` (:func:`_gain_sample`) the features come from the candidates'
    scores on it (``sample_scores``, scored in the same pass as the ranking's own; None:
    scored here); the ranking's scores and ``signals`` stay those of the whole target."""
    if method != FEATURE_METHOD:
        return {}, {}, unavailable
    tx = get_scorer("textemb").score(prepared, reg, entries)
    signals = {"textemb": dict(tx.values)}
    if model is None:
        return signals, {}, unavailable
    summary = model_summary(model)
    by_id = {e.id: e for e in entries}
    usable = {k: v for k, v in scores.items() if k in tx.values}
    if reference is None or not usable:
        return signals, {}, Recommendation("unavailable", reason="no source has the "
                                           "scores the gain model reads", model=summary)
    notes = []
    fitted_n = summary.get("target_max_train")
    if sample is not None:
        if sample_scores is None:
            sample_scores = scorer.score(sample, reg, [by_id[k] for k in usable]).values
        usable = {k: v for k, v in sample_scores.items() if k in usable}
        reference = sample.base_logme()
        tx = get_scorer("textemb").score(sample, reg, entries)
        notes.append(f"predicted from a {sample.n}-example sample of the target, the size "
                     f"the model's gains were measured at")
    elif fitted_n and prepared.n < fitted_n / 2:
        notes.append(f"calibrated on targets of {fitted_n} training examples; this one has "
                     f"{prepared.n}")
    feats = gain_features(usable, reference, textemb=tx.values,
                          num_examples={k: by_id[k].num_examples for k in usable})
    predictions = model.predict(feats)
    rec = recommend(predictions, {k: by_id[k].task_id for k in predictions},
                    min_gain=min_gain, model=summary)
    unseen = sorted({by_id[k].task_id for k in predictions} - set(model.sources_))
    if unseen:
        notes.append(f"{len(unseen)} of {len(predictions)} sources are outside the "
                     f"calibration pool")
    if len(usable) < len(scores):
        notes.append(f"{len(scores) - len(usable)} scored source(s) have no task vector and "
                     f"no prediction")
    return signals, predictions, dataclasses.replace(rec, notes=tuple(notes))


def _overlap_text(v: dict[str, Any]) -> str:
    return (f"{v['normalised']} of {v['of']} target texts ({v['exact']} exact, "
            f"{v['normalised']} after normalising case and white space)")


class _OwnData:
    """Whether an ESM was built from the target's own data: the same data hash, or the
    same built-in task (never a name alone: two files named train.csv are two tasks).
    Reads an ESM's config once, and hashes the target's data once per ranking."""

    def __init__(self, registry: Registry, task: Task) -> None:
        self.registry, self.task = registry, task
        self.builtin = task.spec.get("builtin")
        self._hash: str | None = None
        self._known: dict[str, bool] = {}

    def __call__(self, esm_id: str) -> bool:
        if esm_id not in self._known:
            self._known[esm_id] = self._check(esm_id)
        return self._known[esm_id]

    def _check(self, esm_id: str) -> bool:
        try:
            config = self.registry.config(esm_id)
        except (StepstoneError, OSError):
            return False  # unreadable: the scorer reports it among the errors
        if config.task_data_hash:
            if self._hash is None:
                self._hash = self.task.data_hash()
            if config.task_data_hash == self._hash:
                return True
        if self.builtin is None or config.task_id != self.builtin:
            return False
        if config.task_spec:
            return config.task_spec.get("builtin") == self.builtin
        # built before specs were recorded: a built-in task's origin is 'PACKAGE VERSION:
        # PATH'
        origin = config.task_origin
        return ": " in origin and not origin.startswith(("hub:", "hfselect"))


def registry_encoder(reg: Registry, name: str | None = None, *, pooling: str | None = None,
                     max_length: int | None = None) -> Encoder:
    """Load the encoder ``name`` (default: the one ``reg`` was built with) with the
    registry's pooling and max length for it, unless given.

    The registry's configuration is found by name (a known Hub id and its package are
    one name, :mod:`stepstone.esm.identity`), else by the loaded weights' fingerprint, so
    ``--encoder FOLDER`` matches ESMs recorded under a Hub id for the same weights.
    """
    known = reg.encoders()
    name = name or (known[0].name if known else DEFAULT_ENCODER)
    match = next((k for k in known if same_encoder_name(k.name, name)), None)
    encoder = load_encoder(name, pooling=pooling or (match.pooling if match else None),
                           max_length=max_length or (match.max_length if match else None))
    if match is None and pooling is None and max_length is None:
        same = next((k for k in known if k.fingerprint == encoder.fingerprint), None)
        if same is not None and (same.pooling, same.max_length) != (encoder.pooling,
                                                                    encoder.max_length):
            encoder = Encoder(encoder.model, encoder.tokenizer, name=encoder.name,
                              pooling=same.pooling, max_length=same.max_length,
                              device=encoder.device)
    return encoder


_OWN_DATA = "built from the target's own data (same data hash); --include-target keeps it"


def _encoder_skip_reason(enc: EncoderIdentity, target: EncoderIdentity) -> str:
    diffs = enc.mismatches(target)
    return (f"made for another encoder: {enc.name!r} differs in "
            + ", ".join(f"{f} ({getattr(enc, f)!r} vs {getattr(target, f)!r})" for f in diffs)
            + ("" if enc.fingerprint else
               "; the ESM records no weights fingerprint and its encoder is not installed "
               "(re-import it with that encoder)"))


def _candidates(registry: Registry, target: Target) -> tuple[list[str], dict[str, str]]:
    """The ids of the ESMs made for the target's encoder (ordered as
    :meth:`Registry.entries`), and why each other one is skipped. Rows are selected in
    SQL by their encoder configuration: nothing is read per row."""
    known = registry.encoders()
    same = [k for k in known if not k.mismatches(target.encoder)]
    skipped: dict[str, str] = {}
    for enc in known:
        if enc not in same:
            why = _encoder_skip_reason(enc, target.encoder)
            skipped.update((i, why) for i in registry.ids(encoders=[enc]))
    return (registry.ids(encoders=same) if same else []), skipped


def _first_stage_without_own(registry: Registry, target: Target, candidates: list[str],
                             k: int, own_data: _OwnData | None) -> tuple[list[str], list[str]]:
    """The first stage's ``k`` best among ``candidates`` that were not built from the
    target's own data, and the own ones it met on the way: only the kept candidates'
    configs are read (the own ones are searched past, as if excluded beforehand)."""
    own: list[str] = []
    while True:
        kept = first_stage_ids(registry, target.X, target.labels, candidates, k,
                               label_kind=target.label_kind)
        found = [i for i in kept if own_data is not None and own_data(i)]
        if not found:
            return kept, own
        own += found
        drop = set(found)
        candidates = [i for i in candidates if i not in drop]


def _check_encoder(reg: Registry, encoder: Encoder) -> None:
    """:meth:`Registry.check_encoder`; for an early-exit layer the registry has no ESMs
    for, the error also names the build option that makes them."""
    try:
        reg.check_encoder(encoder.identity)
    except EncoderMismatchError as err:
        if encoder.layer is None:
            raise
        layers = sorted({k.layer for k in reg.encoders() if k.layer is not None})
        raise EncoderMismatchError(
            f"{err} No ESM here was fitted on layer {encoder.layer}'s embeddings (early-exit "
            f"layers here: {', '.join(map(str, layers)) or 'none'}); add them with "
            f"`stepstone registry build --registry DIR --sources ... --exit-layers "
            f"{encoder.layer}`.") from err


def _check_kept_models(scorer: Scorer, reg: Registry, entries: list[RegistryEntry]) -> None:
    """Refuse a method that scores kept source models when no candidate has one."""
    if scorer.needs_kept_model and entries and not any(e.has_model for e in entries):
        raise ConfigError(
            f"Method {scorer.name!r} scores each source with its kept fine-tuned model, and "
            f"registry {str(reg.path)!r} kept none for its {len(entries)} candidate(s). "
            "Build the sources with `stepstone registry build --keep-models` (into a new "
            "folder, or a copy of this one), or use --method esm-logme.")


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
    check_leakage: bool = True,
    gain: bool | str | Path | GainModel = True,
    min_gain: float = 0.0,
    filters: CandidateFilter | None = None,
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
        Score only the ``prefilter`` candidates the FAISS ESM sketch index ranks highest
        for the target (a first-order model of ESM-LogME,
        :mod:`stepstone.selection.sketch`), plus any candidate it cannot sketch, then
        rank those by ``method``.
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
    exclude_target : bool
        Leave out ESMs built from the target's own data (same data hash, or the same
        built-in task); they are listed in ``Ranking.skipped``. With ``prefilter``, only
        the kept candidates' configs are read (and those under the target's names): an
        own ESM the first stage never reaches is cut with the rest, unlisted.
    check_leakage : bool
        Count the target texts each source holds (exact and normalised matches;
        :mod:`stepstone.esm.leakage`) into ``Ranking.leakage``.
    gain : bool, path or GainModel
        Predict each source's gain (points over no intermediate step, with an
        interval) and recommend a source or none (:mod:`stepstone.selection.gain`):
        True reads the shipped model, a path or a :class:`GainModel` another one, False
        skips it. Only for ``esm-logme`` rankings with the model's encoder; otherwise
        ``Ranking.recommendation`` is ``unavailable`` and says why.
    min_gain : float
        Recommend a source only when its predicted gain exceeds this many points.
    filters : CandidateFilter, optional
        Narrow the candidates before anything is scored (conditions on recorded
        metadata, include/exclude globs; :mod:`stepstone.esm.filters`). Each ESM
        filtered out is in ``Ranking.skipped`` with the rule; ``settings['filtered_out']``
        counts them by rule.

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
    if filters is not None and not isinstance(filters, CandidateFilter):
        raise ConfigError(f"'filters' must be a CandidateFilter or None; got "
                          f"{type(filters).__name__}.")
    reg = registry if isinstance(registry, Registry) else open_registry(registry)
    task = load_task(target, **(task_options or {})) if isinstance(target, str) else target
    check_label_kind(method, task.label_kind)
    if encoder is None or isinstance(encoder, str):
        encoder = registry_encoder(reg, encoder, pooling=pooling, max_length=max_length)
    if layer == "auto":
        layer = _auto_layer(reg, task, encoder, DEFAULT_EXIT_THRESHOLD if exit_threshold is None
                            else exit_threshold)
    if layer is not None and encoder.layer != layer:
        encoder = encoder.with_layer(layer)
    timings["load"] = time.perf_counter() - t0
    _check_encoder(reg, encoder)
    t1 = time.perf_counter()
    # Not `cache or None`: an EmbeddingCache has a length, and an empty one is falsy.
    emb_cache = EmbeddingCache() if cache is True else (
        cache if isinstance(cache, EmbeddingCache) else None)
    prepared = prepare_target(task, encoder, max_examples=max_examples, cache=emb_cache,
                              progress=progress)
    timings["embed"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    ids, skipped = _candidates(reg, prepared)
    other_encoder = len(skipped)
    own_data = _OwnData(reg, task) if exclude_target else None
    own: list[str] = []
    if own_data is not None:
        # Every candidate's config is read when every candidate is scored or filtered
        # anyway; with a first stage alone, only the rows under the target's names and
        # then the kept candidates' (own ESMs are searched past, as if excluded first).
        check_all = prefilter is None or bool(filters)
        likely = None if check_all else set(reg.ids(
            task_ids=sorted({task.task_id, own_data.builtin} - {None})))
        own = [i for i in ids if (likely is None or i in likely) and own_data(i)]
        drop = set(own)
        ids = [i for i in ids if i not in drop]
    narrowed = filter_entries(reg, reg.entries_for(ids), filters) if filters else None
    if narrowed is not None:
        ids = [e.id for e in narrowed.kept]
    timings["candidates"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    if prefilter is not None:
        # The K best candidates of the ESM sketch index, searched among the candidates
        # only (issue 18: it used to keep K + 1 nearest of all, then cut by name).
        ids, late = _first_stage_without_own(reg, prepared, ids, prefilter,
                                             own_data if not filters else None)
        own += late
    entries = reg.entries_for(ids)
    skipped.update((i, _OWN_DATA) for i in own)
    if narrowed is not None:
        skipped.update(narrowed.filtered)
    timings["prefilter"] = time.perf_counter() - t2
    _check_kept_models(scorer, reg, entries)
    t5 = time.perf_counter()
    gain_model, unavailable, sample = None, None, None
    if gain is not False:
        gain_model, unavailable = _gain_model(gain, method=method, encoder=encoder)
        sample = _gain_sample(gain_model, prepared)
    gain_seconds = time.perf_counter() - t5
    t3 = time.perf_counter()
    sample_scores = None
    if sample is not None and entries and hasattr(scorer, "score_targets"):
        # the gain features' sample is scored in the same pass: each ESM is read once
        scores, on_sample = scorer.score_targets([prepared, sample], reg, entries,
                                                 progress=progress)
        sample_scores = on_sample.values
    else:
        scores = scorer.score(prepared, reg, entries, progress=progress)
    timings["score"] = time.perf_counter() - t3
    reference = prepared.base_logme() if "logme" in method else None
    by_id = {e.id: e for e in entries}
    signals: dict[str, dict[str, float]] = {}
    predictions: dict[str, GainPrediction] = {}
    recommendation = None
    if gain is not False:  # from every candidate's score, before `top` cuts rows
        t5 = time.perf_counter()
        signals, predictions, recommendation = _gains(
            gain_model, unavailable, method=method, reg=reg, prepared=prepared,
            entries=entries, scores=scores.values, reference=reference, scorer=scorer,
            sample=sample, sample_scores=sample_scores, min_gain=min_gain)
        timings["gain"] = gain_seconds + time.perf_counter() - t5
    ordered = sorted(scores.values.items(), key=lambda kv: (-kv[1], by_id[kv[0]].task_id))
    tied = _tied([s for _, s in ordered])  # before `top`: a cut row can tie a shown one
    if top is not None:
        ordered = ordered[:top]
    rows = [RankedSource(i + 1, esm_id, by_id[esm_id].task_id, float(s),
                         by_id[esm_id].num_examples, by_id[esm_id].label_kind,
                         *((predictions[esm_id].gain, predictions[esm_id].low,
                            predictions[esm_id].high) if esm_id in predictions else ()))
            for i, (esm_id, s) in enumerate(ordered)]
    for row, is_tied in zip(rows, tied, strict=False):
        row.tied = is_tied
    leakage: dict[str, dict[str, Any]] = {}
    if check_leakage:  # the shown sources' texts against the target's
        from stepstone.esm.leakage import leakage_report

        t4 = time.perf_counter()
        leakage = leakage_report(task, reg, [by_id[r.esm_id] for r in rows], cache_dir=(
            emb_cache.directory if emb_cache is not None else None))
        timings["leakage"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    settings = {
        "registry": str(reg.path), "encoder": encoder.name, "pooling": encoder.pooling,
        "max_length": encoder.max_length, "layer": encoder.layer,
        "target_examples": prepared.n, "candidates": len(entries), "prefilter": prefilter,
        "skipped_other_encoder": other_encoder, "exclude_target": exclude_target,
        "excluded_target": own, "encoder_fingerprint": encoder.identity.fingerprint,
        "filters": filters.to_dict() if filters else None,
        "filtered_out": narrowed.counts() if narrowed is not None else {},
        **scorer.settings(),
    }
    return Ranking(task.task_id, method, rows, scores.errors, reference, settings,
                   {k: round(v, 4) for k, v in timings.items()}, task.label_info(),
                   skipped, leakage, task.split_note, recommendation, signals)
