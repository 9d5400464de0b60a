"""Transferability scorers: every method has the same call shape.

``scorer.score(target, registry, entries) -> Scores``: one score per registry
entry (higher = expected to help the target more), and an error message for
each entry that could not be scored, so one broken ESM never stops a ranking.

Methods
-------
esm-logme     LogME of the target embeddings after each source's ESM (Schulte et al. 2024)
knn           leave-one-out kNN accuracy of the ESM-mapped target embeddings
logme         LogME on the base embeddings, no map: the same for every source; the
              "no intermediate step" reference
textemb       cosine of mean base embeddings of target and source (TextEmb, Vu et al. 2020)
vocab         share of the target's frequent words found among the source's
source-logme  LogME on embeddings from the kept fine-tuned source model (the expensive
              quantity ESMs approximate); only for sources built with --keep-models
kernel        held-out eNTK accuracy with each kept source model (Malladi et al. 2023);
              only for sources built with --keep-models; slow
random        seeded random scores (a floor for benchmarks)

Other code adds methods with :func:`register_scorer`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from stepstone.esm.data import Split
from stepstone.esm.encoder import EncoderMismatchError
from stepstone.esm.errors import ConfigError, StepstoneError
from stepstone.esm.model import AFFINE_ARCHITECTURES, EmbeddingSpaceMap
from stepstone.esm.registry import Registry, RegistryEntry
from stepstone.esm.sampling import uniform_indices
from stepstone.esm.taskmodel import TaskModel, metrics_from_outputs
from stepstone.selection.entk import KernelError, compute_kernel
from stepstone.selection.entk_formulations import ClassifierFormulation
from stepstone.selection.entk_solvers import KernelSettings, few_shot, solve
from stepstone.selection.logme import TargetBasis, logme_score
from stepstone.selection.logme_maps import logme_linear_maps
from stepstone.selection.target import Target

logger = logging.getLogger(__name__)

# What loading or scoring one source may raise: the library's own errors (a bad ESM
# folder or config, another encoder, a failed check), a file that cannot be read, and an
# SVD that does not converge. Anything else is a bug and propagates.
_PER_ESM_ERRORS = (StepstoneError, OSError, np.linalg.LinAlgError)

# Options of rank() itself that change what a method computes. A method takes one when
# its class lists it in ``options``; its other options are its constructor's keywords.
RANK_OPTIONS: tuple[str, ...] = ("prefilter", "layer")

_NON_FINITE = "the ESM maps the target's embeddings to NaN or inf"


@dataclass
class Scores:
    """Scores by ESM id, and error messages by ESM id for those that failed."""

    values: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def update(self, other: Scores) -> None:
        self.values.update(other.values)
        self.errors.update(other.errors)


class Scorer:
    """Base class: subclasses set ``name`` and implement :meth:`score`."""

    name: ClassVar[str] = ""
    uses_esm: ClassVar[bool] = False
    # Every option this method takes: its constructor's keywords and the RANK_OPTIONS
    # that apply to it. rank() and get_scorer refuse any other before doing any work.
    options: ClassVar[tuple[str, ...]] = ("prefilter",)
    # The target label kinds it can score.
    label_kinds: ClassVar[tuple[str, ...]] = ("classification", "regression")
    # Whether it scores with the fine-tuned source models a build kept (--keep-models).
    needs_kept_model: ClassVar[bool] = False

    def score(self, target: Target, registry: Registry, entries: list[RegistryEntry], *,
              progress: bool = False) -> Scores:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}


def _load(registry: Registry, entry: RegistryEntry, target: Target) -> EmbeddingSpaceMap:
    esm = registry.load_esm(entry.id, encoder=target.encoder)
    if esm.config.in_dim != target.X.shape[1]:
        raise EncoderMismatchError(f"ESM expects dim {esm.config.in_dim}; target embeddings "
                                   f"have {target.X.shape[1]}.")
    return esm


class ESMLogME(Scorer):
    """ESM-LogME (Schulte, Hamborg, Akbik, EMNLP 2024).

    Affine ESMs (linear, low-rank) are scored in batches of ``chunk`` from the
    target's shared SVD without materialising the mapped embeddings; other
    architectures are mapped and scored one by one. ``approx_rank`` keeps only the
    target's top principal directions (faster, approximate). ``n_jobs`` threads
    share the affine maps (None: ``$STEPSTONE_THREADS``, else every available CPU);
    the scores do not depend on it.
    """

    name = "esm-logme"
    uses_esm = True
    options = ("approx_rank", "chunk", "n_jobs", "prefilter", "layer")

    def __init__(self, *, approx_rank: int | None = None, chunk: int = 64,
                 n_jobs: int | None = None) -> None:
        if approx_rank is not None and approx_rank < 1:
            raise ConfigError(f"'approx_rank' must be a positive int or None; got {approx_rank}.")
        if chunk < 1:
            raise ConfigError(f"'chunk' must be >= 1; got {chunk}.")
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int)
                                   or n_jobs < 1):
            raise ConfigError(f"'n_jobs' must be a positive int or None; got {n_jobs!r}.")
        self.approx_rank, self.chunk, self.n_jobs = approx_rank, chunk, n_jobs

    def settings(self) -> dict:
        return {"approx_rank": self.approx_rank, "chunk": self.chunk}

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        return self.score_targets([target], registry, entries, progress=progress)[0]

    def score_targets(self, targets: list[Target], registry: Registry,
                      entries: list[RegistryEntry], *, progress: bool = False) -> list[Scores]:
        """:meth:`score` for several targets embedded by one encoder (a target and a
        sample of it), reading each ESM once; one :class:`Scores` per target."""
        outs = [Scores() for _ in targets]
        bar = tqdm(total=len(entries), desc="ESM-LogME", unit="ESM", disable=not progress,
                   leave=False)
        for start in range(0, len(entries), self.chunk):
            loaded = {}
            for entry in entries[start:start + self.chunk]:
                try:
                    loaded[entry.id] = _load(registry, entry, targets[0])
                except _PER_ESM_ERRORS as err:
                    for out in outs:
                        out.errors[entry.id] = f"{type(err).__name__}: {err}"
            for out, target in zip(outs, targets, strict=True):
                out.update(self.score_maps(target, loaded))
            bar.update(min(self.chunk, len(entries) - start))
        bar.close()
        return outs

    def score_maps(self, target: Target, esms: dict[str, EmbeddingSpaceMap]) -> Scores:
        """Score in-memory ESMs (keyed by id) on ``target``.

        Affine maps go through the shared target basis ``chunk`` at a time, so the
        float64 weight copies alive at once are bounded by the chunk, not the count.
        """
        out = Scores()
        basis = target.memo(("basis", self.approx_rank),
                            lambda: TargetBasis(target.X, target.labels,
                                                label_kind=target.label_kind,
                                                rank=self.approx_rank))
        pending: list[tuple[str, EmbeddingSpaceMap]] = []
        for esm_id, esm in esms.items():
            if esm.config.architecture in AFFINE_ARCHITECTURES:
                pending.append((esm_id, esm))
                if len(pending) == self.chunk:
                    out.update(_score_affine(basis, pending, self.n_jobs))
                    pending = []
                continue
            try:  # non-affine maps: materialise this one map's output, score, drop it
                mapped = esm.transform(target.X)
                if not np.isfinite(mapped).all():
                    out.errors[esm_id] = _NON_FINITE
                    continue
                out.values[esm_id] = logme_score(mapped, target.labels,
                                                 label_kind=target.label_kind)
            except _PER_ESM_ERRORS as err:
                out.errors[esm_id] = f"{type(err).__name__}: {err}"
        if pending:
            out.update(_score_affine(basis, pending, self.n_jobs))
        return out


def _score_affine(basis: TargetBasis, esms: list[tuple[str, EmbeddingSpaceMap]],
                  n_jobs: int | None) -> Scores:
    out = Scores()
    pairs = [esm.affine() for _, esm in esms]
    scores = logme_linear_maps(basis, np.stack([w for w, _ in pairs]),
                               np.stack([b for _, b in pairs]), n_jobs=n_jobs)
    for (esm_id, _), value in zip(esms, scores, strict=True):
        if np.isfinite(value):
            out.values[esm_id] = float(value)
        else:
            out.errors[esm_id] = f"LogME returned {value}"
    return out


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, *, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy under cosine similarity.

    features: float array of shape (n, d); labels: int array of shape (n,).
    """
    F = features.astype(np.float64)
    F /= np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)
    sims = F @ F.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(F) - 1)
    nn_idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    votes = labels[nn_idx]
    n_classes = int(labels.max()) + 1
    counts = np.zeros((len(F), n_classes))
    np.add.at(counts, (np.repeat(np.arange(len(F)), k), votes.ravel()), 1.0)
    # ties go to the nearest neighbour's class
    nearest = labels[nn_idx[np.arange(len(F)), np.argmax(sims[np.arange(len(F))[:, None],
                                                              nn_idx], axis=1)]]
    best = counts.max(1)
    pred = np.where(counts[np.arange(len(F)), nearest] == best, nearest, counts.argmax(1))
    return float(np.mean(pred == labels))


class KNN(Scorer):
    """Leave-one-out kNN accuracy of the ESM-mapped target embeddings (classification)."""

    name = "knn"
    uses_esm = True
    options = ("k", "prefilter", "layer")
    label_kinds = ("classification",)

    def __init__(self, *, k: int = 5) -> None:
        if k < 1:
            raise ConfigError(f"'k' must be >= 1; got {k}.")
        self.k = k

    def settings(self) -> dict:
        return {"k": self.k}

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        check_label_kind(self.name, target.label_kind)
        out = Scores()
        for entry in tqdm(entries, desc="kNN", unit="ESM", disable=not progress, leave=False):
            try:
                mapped = _load(registry, entry, target).transform(target.X)
                if not np.isfinite(mapped).all():
                    out.errors[entry.id] = _NON_FINITE
                    continue
                out.values[entry.id] = knn_loo_accuracy(mapped, target.labels, k=self.k)
            except _PER_ESM_ERRORS as err:
                out.errors[entry.id] = f"{type(err).__name__}: {err}"
        return out


class BaseLogME(Scorer):
    """LogME on the base embeddings (no map): one value, the same for every source."""

    name = "logme"
    options = ("prefilter", "layer")

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        value = target.base_logme()
        return Scores({e.id: value for e in entries})


class TextEmb(Scorer):
    """Cosine of the mean base embeddings of target and source (Vu et al. 2020)."""

    name = "textemb"
    options = ("prefilter", "layer")

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        out = Scores()
        for e in entries:
            if e.task_vector is None or e.task_vector.shape != target.mean_vector.shape:
                out.errors[e.id] = "no task vector of the target's dimension in the registry"
            else:
                out.values[e.id] = float(e.task_vector @ target.mean_vector)
        return out


class VocabOverlap(Scorer):
    """Share of the target's frequent words (top 5,000, no stop words) in the source's."""

    name = "vocab"

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        out = Scores()
        words = set(target.token_counts)
        for e in entries:
            counts = registry.profile(e.id).get("token_counts")
            if not counts:
                out.errors[e.id] = "no word profile stored with this ESM"
            elif not words:
                out.errors[e.id] = "the target has no words to compare"
            else:
                out.values[e.id] = len(words & set(counts)) / len(words)
        return out


class SourceLogME(Scorer):
    """LogME on target embeddings from each kept fine-tuned source encoder."""

    name = "source-logme"
    options = ("batch_size", "prefilter")
    needs_kept_model = True

    def __init__(self, *, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ConfigError(f"'batch_size' must be >= 1; got {batch_size}.")
        self.batch_size = batch_size

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        def one(enc) -> float:  # the inner bar advances per batch of target texts
            feats = enc.embed(target.texts, batch_size=self.batch_size, progress=progress)
            return logme_score(feats, target.labels, label_kind=target.label_kind)

        return score_kept_models(target, registry, entries, one, desc="source models",
                                 progress=progress)


def score_kept_models(target: Target, registry: Registry, entries: list[RegistryEntry],
                      fn, *, desc: str, progress: bool = False,
                      catch: tuple[type[BaseException], ...] = ()) -> Scores:
    """``fn(source_encoder)`` for every entry whose registry kept its fine-tuned model
    (loaded with the target's pooling and max length); entries without one, and
    per-source failures (``_PER_ESM_ERRORS`` and ``catch``), become ``Scores.errors``."""
    from stepstone.esm.encoder import load_encoder

    out = Scores()
    for e in tqdm(entries, desc=desc, unit="model", disable=not progress, leave=False):
        folder = registry.model_dir(e.id)
        if folder is None:
            out.errors[e.id] = "no fine-tuned source model kept (build with --keep-models)"
            continue
        try:
            enc = load_encoder(str(folder / "encoder"), pooling=target.encoder.pooling,
                               max_length=target.encoder.max_length)
            out.values[e.id] = float(fn(enc))
        except (*_PER_ESM_ERRORS, *catch) as err:
            out.errors[e.id] = f"{type(err).__name__}: {err}"
    return out


class KernelScorer(Scorer):
    """``rank --method kernel``: held-out eNTK accuracy with each kept source model.

    For every candidate with a kept fine-tuned model (``registry build
    --keep-models``), the source-tuned encoder gets a fresh head (seeded) and the
    target's few-shot sample (``shots`` per class from the target examples) is
    solved with its eNTK (Malladi et al. 2023); the score is the accuracy on up to
    ``eval_examples`` other target examples (classification), or minus the MSE
    (regression). Slow: one kernel per candidate; for short candidate lists.
    """

    name = "kernel"
    needs_kept_model = True
    options = ("shots", "eval_examples", "seed", "kernel", "params", "include_head", "solver",
               "ridge", "prefilter")

    def __init__(self, *, shots: int = 16, eval_examples: int = 200, seed: int = 0,
                 kernel: str = "sgd", params: str = "biases", include_head: bool = True,
                 solver: str = "regression", ridge: float = 1e-3) -> None:
        if shots < 1 or eval_examples < 1:
            raise ConfigError(f"Need shots >= 1 and eval_examples >= 1; got {shots}, "
                             f"{eval_examples}.")
        self.shots, self.eval_examples, self.seed = shots, eval_examples, seed
        self.kernel_settings = KernelSettings(kernel=kernel, params=params,
                                              include_head=include_head, solver=solver,
                                              ridge=ridge)

    def settings(self) -> dict:
        return {"shots": self.shots, "eval_examples": self.eval_examples, "seed": self.seed,
                **{k: v for k, v in self.kernel_settings.to_dict().items()
                   if k in ("kernel", "params", "include_head", "solver", "ridge")}}

    def _split(self, target) -> tuple[Split, Split]:
        labels = np.asarray(target.labels)
        full = Split(tuple(target.texts), labels)
        train = few_shot(full, self.shots, label_kind=target.label_kind, seed=self.seed)
        chosen = set(train.texts)
        rest = np.array([i for i, t in enumerate(target.texts) if t not in chosen])
        if len(rest) == 0:
            raise KernelError(f"The target has no examples left to evaluate the kernel on "
                             f"after {self.shots} shots per class.")
        rest = rest[uniform_indices(len(rest), self.eval_examples, seed=self.seed)]
        return train, full.take(rest)

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        train, held = self._split(target)
        num_labels = int(np.max(target.labels)) + 1 if target.label_kind == "classification" \
            else 1
        s = self.kernel_settings

        def one(enc) -> float:
            torch.manual_seed(self.seed)
            model = TaskModel(enc, num_labels)
            km = compute_kernel(ClassifierFormulation(model), train.inputs(), held.inputs(),
                                **s.kernel_options(), progress=progress)  # per example
            pred = solve(km, train.labels, label_kind=target.label_kind, settings=s)
            metrics = metrics_from_outputs(pred, held.labels, target.label_kind)
            return metrics["accuracy"] if "accuracy" in metrics else -metrics["mse"]

        return score_kept_models(target, registry, entries, one, desc="eNTK per source",
                                 progress=progress, catch=(KernelError,))


class RandomScorer(Scorer):
    """Seeded uniform random scores: the floor any method should beat."""

    name = "random"
    options = ("seed", "prefilter")

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def settings(self) -> dict:
        return {"seed": self.seed}

    def score(self, target, registry, entries, *, progress=False) -> Scores:
        rng = np.random.default_rng(self.seed)
        return Scores({e.id: float(v) for e, v in zip(entries, rng.random(len(entries)),
                                                       strict=True)})


SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (ESMLogME, KNN, BaseLogME, TextEmb, VocabOverlap, SourceLogME,
                              KernelScorer, RandomScorer)
}
# The built-in methods; stays fixed. Methods registered later are in available_methods().
METHODS: tuple[str, ...] = tuple(SCORERS)


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Add a scorer class defined elsewhere, so ``get_scorer`` and ``rank`` see it (the
    CLI's ``--method`` lists the methods available when it starts). Usable as a class
    decorator; registering the same class again is a no-op.

    Raises
    ------
    ValueError
        When ``cls`` is not a :class:`Scorer` subclass with a ``name``, or the name is
        taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Scorer)) or not cls.name:
        raise ValueError(f"Expected a Scorer subclass with a non-empty 'name'; got {cls!r}.")
    known = SCORERS.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"Method name {cls.name!r} is already taken by "
                         f"{known.__module__}.{known.__qualname__}.")
    SCORERS[cls.name] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    """Every method ``get_scorer`` accepts now: the built-in ones and registered ones."""
    return tuple(SCORERS)


def scorer_class(method: str) -> type[Scorer]:
    """The scorer class of a method name.

    Raises
    ------
    ConfigError
        When no method has that name.
    """
    if method not in SCORERS:
        raise ConfigError(f"'method' must be one of {list(SCORERS)}; got {method!r}.")
    return SCORERS[method]


def check_options(method: str, given: Iterable[str], *, rank: bool = True) -> None:
    """Refuse any option ``method`` does not take, naming the ones it does.

    ``given``: option names (``rank()``'s keywords such as ``approx_rank``, or the
    scorer's own). With ``rank=False`` only the scorer's constructor options count.

    Raises
    ------
    ConfigError
        ``"method 'knn' does not take 'approx_rank'; it takes: k, prefilter, layer."``
    """
    cls = scorer_class(method)
    takes = [o for o in cls.options if rank or o not in RANK_OPTIONS]
    for name in given:
        if name not in takes:
            raise ConfigError(f"method {method!r} does not take {name!r}; it takes: "
                              f"{', '.join(takes) or 'no options'}.")


def check_label_kind(method: str, label_kind: str) -> None:
    """Refuse a target whose label kind ``method`` cannot score."""
    kinds = scorer_class(method).label_kinds
    if label_kind not in kinds:
        raise ConfigError(f"method {method!r} needs a {' or '.join(kinds)} target; got "
                          f"{label_kind}.")


def get_scorer(method: str, **options) -> Scorer:
    """Instantiate a scorer by method name; options go to its constructor.

    Raises
    ------
    ConfigError
        For an unknown method, an option it does not take, or an invalid value.
    """
    check_options(method, options, rank=False)
    return SCORERS[method](**options)
