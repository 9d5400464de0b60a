"""Stable fine-tuning: seed ensembles, stochastic weight averaging and DENI.

Small-data fine-tuning swings with the seed; a transfer gain smaller than that
swing is noise. :func:`train_stabilized` trains a :class:`~stepstone.finetune.train.TaskModel`
with one of four stabilisers and returns a :class:`StabilizedModel` that predicts
and evaluates like a single model:

``none``
    a plain :func:`~stepstone.finetune.train.finetune` run (bit-identical weights).
``ensemble``
    ``members`` independent runs that differ in seed (head init, batch order,
    dropout); predictions by majority vote or mean probability.
``swa``
    stochastic weight averaging (Izmailov et al. 2018, arXiv 1803.05407) with
    :mod:`torch.optim.swa_utils`: from ``swa_start`` of the steps the learning rate
    goes to a constant (:class:`~torch.optim.swa_utils.SWALR`) and the weights are
    averaged every ``swa_every`` steps; the average is the final model.
``deni``
    Delayed Ensemble with Noisy Interpolation (Pecher et al. 2024, arXiv
    2406.12471), implemented from the description in the issue, not from the
    authors' code. See :func:`deni_schedule` for the exact step arithmetic.

All four train in the one loop, :func:`~stepstone.finetune.train.finetune`: SWA and
DENI are its callbacks (:class:`SwaCallback`, :class:`DeniCallback`), so they
checkpoint and resume like a plain run.

DENI, step by step (N = main-model steps, M = ``members``):

1. *Noisy interpolation*: rounds start after ``s = ceil(0.3N) + k*I`` completed
   main-model steps (``I = interpolation_interval``, ``k = 0, 1, ...``) as long as
   the round's ``I`` steps lie inside the window, ``s + I <= ceil(0.6N)`` (every
   step of every round has ``0.3N <= step < 0.6N``). At a round start M-1 copies of
   the main model are made and each noised per tensor with ``sqrt(0.15 / t) * eps *
   std(tensor)``, ``eps ~ N(0, 1)``, where ``t = s + 1`` is the **1-based index of
   the first main-model step the copies train on**. All M then train on the same
   batches for I steps; the main model keeps its AdamW state and linear schedule,
   the copies get a fresh AdamW with constant per-group learning rates (the main
   model's current ones by default). At the round end the main model's trainable
   weights become the uniform average of the M and the copies are dropped. Round
   steps are main-model steps: they use up the main model's budget.
2. *Delayed ensemble*: after ``ceil(0.9N)`` steps, M-1 copies noised with
   ``sqrt(0.15) * eps * std(tensor)`` train with the main model on the remaining
   steps; the M models predict by majority vote (or mean probability).

Noise goes to the ``head`` layer group of :func:`stepstone.finetune.lr.layer_groups`
(pooler + task head) for full fine-tuning and to all trainable parameters for
parameter-efficient tuning (``noise_scope='auto'``), and never to frozen ones.
``std`` is the population standard deviation of the tensor (a one-element tensor
gets no noise). When N is too small for the interval, no round fits: a warning is
logged and kept in :attr:`StabilizedModel.warnings` (nothing is silently skipped).

Cost is counted in *model-steps*: optimizer steps summed over every model trained.
``none`` and ``swa`` cost N, ``ensemble`` M*N, ``deni``
``N + (M-1) * (interpolation steps + ensemble steps)`` (:meth:`DeniSchedule.model_steps`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stepstone.esm.data import Split, Task
from stepstone.esm.errors import ConfigError
from stepstone.finetune.train import (
    FinetuneSettings,
    TaskModel,
    TrainCallback,
    TrainingError,
    TrainLoop,
    build_optimizer,
    finetune,
    metrics_from_outputs,
    optimizer_from_flat,
    optimizer_to_flat,
    predict,
)

logger = logging.getLogger(__name__)

STABILIZERS: tuple[str, ...] = ("none", "ensemble", "swa", "deni")
VOTES: tuple[str, ...] = ("majority", "mean")
NOISE_SCOPES: tuple[str, ...] = ("auto", "head", "all")
COPY_LRS: tuple[str, ...] = ("current", "peak")


@dataclass
class StabilizerSettings:
    """How to stabilise a fine-tuning run (defaults: the issue's, i.e. the DENI paper's).

    String options are typed ``str`` (the CLI builds ``--option TYPE`` from the field
    types) and checked against :data:`STABILIZERS`, :data:`VOTES`,
    :data:`NOISE_SCOPES` and :data:`COPY_LRS` here.
    """

    kind: str = field(default="none", metadata={
        "help": "Stabiliser: 'none' (one run), 'ensemble' (M seeds, vote), 'swa' (stochastic "
                "weight averaging) or 'deni' (delayed ensemble with noisy interpolation, "
                "Pecher et al. 2024)."})
    members: int = field(default=10, metadata={
        "help": "M: models in the ensemble ('ensemble') or in each DENI interpolation round "
                "and the delayed ensemble ('deni'); the main model counts as one."})
    vote: str = field(default="majority", metadata={
        "help": "How an ensemble predicts a class: 'majority' vote (ties go to the higher "
                "mean probability) or 'mean' probability. Regression always averages."})
    # -- DENI ------------------------------------------------------------------------
    interpolation_start: float = field(default=0.3, metadata={
        "help": "DENI: noisy-interpolation rounds start from this share of the main model's "
                "steps ..."})
    interpolation_end: float = field(default=0.6, metadata={
        "help": "DENI: ... until this share (rounds lie wholly inside the window)."})
    interpolation_interval: int = field(default=125, metadata={
        "help": "DENI: main-model steps per interpolation round (copies train this long, then "
                "are averaged in)."})
    interpolation_noise: float = field(default=0.15, metadata={
        "help": "DENI: interpolation noise is sqrt(this / t) * eps * std(tensor), t = the "
                "1-based main-model step the copies first train on."})
    ensemble_start: float = field(default=0.9, metadata={
        "help": "DENI: the delayed ensemble trains from this share of the steps to the end."})
    ensemble_noise: float = field(default=0.15, metadata={
        "help": "DENI: delayed-ensemble noise is sqrt(this) * eps * std(tensor)."})
    noise_scope: str = field(default="auto", metadata={
        "help": "DENI: parameters that get noise: 'head' (pooler + task head), 'all' "
                "trainable ones, or 'auto' (head for full fine-tuning, all trainable "
                "parameters when some are frozen, i.e. parameter-efficient tuning)."})
    copy_lr: str = field(default="current", metadata={
        "help": "DENI: constant per-group learning rates of the copies' fresh AdamW: the main "
                "model's 'current' (scheduled) ones when copied, or the 'peak' ones."})
    # -- SWA -------------------------------------------------------------------------
    swa_start: float = field(default=0.25, metadata={
        "help": "SWA: share of the steps after which weights are averaged."})
    swa_lr_scale: float = field(default=0.5, metadata={
        "help": "SWA: constant learning rate after swa_start, as a multiple of each layer "
                "group's peak learning rate (torch.optim.swa_utils.SWALR)."})
    swa_anneal: float = field(default=0.05, metadata={
        "help": "SWA: share of the steps over which the learning rate is cosine-annealed "
                "to the SWA rate."})
    swa_every: int = field(default=1, metadata={
        "help": "SWA: average the weights every this many steps (and after the last)."})

    def __post_init__(self) -> None:
        for name, allowed in (("kind", STABILIZERS), ("vote", VOTES),
                              ("noise_scope", NOISE_SCOPES), ("copy_lr", COPY_LRS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name!r} must be one of {list(allowed)}; got {value!r}.")
        if self.members < 1:
            raise ConfigError(f"'members' must be >= 1; got {self.members}.")
        if self.kind in ("ensemble", "deni") and self.members < 2:
            raise ConfigError(f"'members' must be >= 2 for kind={self.kind!r}; got "
                              f"{self.members}.")
        if not (0.0 <= self.interpolation_start <= self.interpolation_end
                <= self.ensemble_start < 1.0):
            raise ConfigError(
                "Need 0 <= interpolation_start <= interpolation_end <= ensemble_start < 1; got "
                f"{self.interpolation_start}, {self.interpolation_end}, {self.ensemble_start}.")
        if self.interpolation_interval < 1 or self.swa_every < 1:
            raise ConfigError(f"'interpolation_interval' and 'swa_every' must be >= 1; got "
                              f"{self.interpolation_interval}, {self.swa_every}.")
        if self.interpolation_noise < 0 or self.ensemble_noise < 0:
            raise ConfigError(f"Noise levels must be >= 0; got interpolation_noise="
                              f"{self.interpolation_noise}, ensemble_noise={self.ensemble_noise}.")
        if not 0.0 <= self.swa_start < 1.0 or not 0.0 <= self.swa_anneal < 1.0:
            raise ConfigError(f"'swa_start' and 'swa_anneal' must be in [0, 1); got "
                              f"{self.swa_start}, {self.swa_anneal}.")
        if not self.swa_lr_scale > 0:
            raise ConfigError(f"'swa_lr_scale' must be > 0; got {self.swa_lr_scale}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- DENI schedule ------------------------------------------------------------------------
def _boundary(share: float, total_steps: int) -> int:
    """The first completed-step count ``s`` with ``s >= share * total_steps``.

    Rounded to 9 decimals first so that ``0.3 * 10`` (3.0000000000000004) gives 3.
    """
    return math.ceil(round(share * total_steps, 9))


@dataclass(frozen=True)
class DeniEvent:
    """Copies made once in a DENI run.

    ``kind``: ``'interpolate'`` (averaged back at ``end``) or ``'ensemble'`` (kept);
    ``start``: main-model steps completed when the copies are made (so ``start + 1``
    is the 1-based step they first train on); ``steps``: steps the copies train;
    ``noise``: the noise multiplier (``eps * std(tensor)`` is scaled by it).
    """

    kind: Literal["interpolate", "ensemble"]
    start: int
    steps: int
    noise: float

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def first_step(self) -> int:
        """1-based main-model step the copies first train on (the ``t`` of the noise)."""
        return self.start + 1


@dataclass(frozen=True)
class DeniSchedule:
    """Every copy event of a DENI run with ``total_steps`` main-model steps."""

    total_steps: int
    events: tuple[DeniEvent, ...]
    warnings: tuple[str, ...] = ()

    @property
    def interpolations(self) -> list[DeniEvent]:
        return [e for e in self.events if e.kind == "interpolate"]

    @property
    def ensemble(self) -> DeniEvent | None:
        return next((e for e in self.events if e.kind == "ensemble"), None)

    @property
    def copy_steps(self) -> int:
        """Steps each copy slot trains, summed over all events."""
        return sum(e.steps for e in self.events)

    def model_steps(self, members: int) -> int:
        """Optimizer steps over all models: ``N + (M - 1) * copy_steps``."""
        return self.total_steps + (members - 1) * self.copy_steps

    def to_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warnings": list(self.warnings),
                "events": [dataclasses.asdict(e) for e in self.events]}


def noise_scale(step: int, settings: StabilizerSettings | None = None) -> float:
    """DENI interpolation noise multiplier ``sqrt(interpolation_noise / step)``.

    step: 1-based main-model step the noised copies first train on (>= 1).
    """
    settings = settings or StabilizerSettings()
    if step < 1:
        raise ValueError(f"'step' is 1-based and must be >= 1; got {step}.")
    return math.sqrt(settings.interpolation_noise / step)


def deni_schedule(total_steps: int, settings: StabilizerSettings | None = None) -> DeniSchedule:
    """The DENI copy events for ``total_steps`` (N) main-model steps.

    Interpolation rounds start after ``s = ceil(a*N) + k*I`` completed steps for
    ``k = 0, 1, ...`` while ``s + I <= ceil(b*N)`` (a, b = interpolation start/end,
    I = interval): each lasts exactly I steps, all inside the window (a partial
    round at the window's end is not made). The delayed ensemble trains the last
    ``N - e`` steps, ``e = ceil(c*N)`` (c = ensemble_start). Noise of a round starting
    after ``s`` steps: :func:`noise_scale` at ``t = s + 1``; of the ensemble:
    ``sqrt(ensemble_noise)``. Empty phases are reported in ``warnings``.
    """
    settings = settings or StabilizerSettings()
    if total_steps < 1:
        raise ValueError(f"'total_steps' must be >= 1; got {total_steps}.")
    n, interval = total_steps, settings.interpolation_interval
    lo = _boundary(settings.interpolation_start, n)
    hi = _boundary(settings.interpolation_end, n)
    ens = _boundary(settings.ensemble_start, n)
    events: list[DeniEvent] = []
    s = lo
    while s + interval <= hi:
        events.append(DeniEvent("interpolate", s, interval, noise_scale(s + 1, settings)))
        s += interval
    warnings = []
    if not events:
        warnings.append(
            f"DENI: no noisy-interpolation round fits in {n} steps: a round of "
            f"interpolation_interval={interval} steps must lie in steps [{lo}, {hi}) (completed "
            f"steps); use a smaller interval or more steps. This run "
            f"has the delayed ensemble only.")
    if ens < n:
        events.append(DeniEvent("ensemble", ens, n - ens, math.sqrt(settings.ensemble_noise)))
    else:
        warnings.append(f"DENI: no step left for the delayed ensemble in {n} steps "
                        f"(ensemble_start={settings.ensemble_start}); it is a single model.")
    return DeniSchedule(n, tuple(events), tuple(warnings))


# -- building blocks ------------------------------------------------------------------------
def noise_parameter_names(model: nn.Module, scope: str) -> list[str]:
    """Names of the trainable parameters that DENI noise goes to.

    scope: ``'head'`` (the ``head`` layer group of :func:`stepstone.finetune.lr.layer_groups`:
    pooler + task head), ``'all'`` (every trainable parameter), or ``'auto'``
    (``'head'`` when every parameter is trainable, else ``'all'``).
    """
    if scope not in NOISE_SCOPES:
        raise ValueError(f"'scope' must be one of {list(NOISE_SCOPES)}; got {scope!r}.")
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    if scope == "auto":
        scope = "head" if len(trainable) == len(named) else "all"
    if scope == "all":
        return trainable
    from stepstone.finetune.lr import layer_groups

    groups = layer_groups(model)
    return list(groups.params[groups.names.index("head")])


@torch.no_grad()
def add_noise(model: nn.Module, scale: float, *, names: Sequence[str],
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Add ``scale * eps * std(tensor)`` to each named parameter in place.

    ``eps ~ N(0, 1)`` has the tensor's shape and is drawn from ``generator`` (CPU);
    ``std`` is the population standard deviation (0 for one-element tensors).
    Returns the ``eps`` drawn, by parameter name.
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"Expected parameter names of the model; got unknown {missing[:3]}.")
    drawn = {}
    for name in names:
        p = params[name]
        eps = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        std = p.detach().float().std(correction=0) if p.numel() > 1 else p.new_zeros(())
        p.add_((scale * std * eps.to(p.device)).to(p.dtype))
        drawn[name] = eps
    return drawn


@torch.no_grad()
def average_into(target: nn.Module, models: Sequence[nn.Module]) -> None:
    """Set ``target``'s trainable parameters to the uniform mean over ``models``.

    ``models`` may include ``target``; frozen parameters and buffers are left alone
    (they are equal across DENI copies). All models must have the same parameter names.
    """
    if not models:
        raise ValueError("Expected at least one model to average; got none.")
    named = [dict(m.named_parameters()) for m in models]
    means = {}
    for name, p in target.named_parameters():
        if not p.requires_grad:
            continue
        if any(name not in d for d in named):
            raise ValueError(f"Expected every model to have parameter {name!r}; one has not.")
        means[name] = torch.stack([d[name].detach() for d in named]).mean(0)
    for name, p in target.named_parameters():
        if name in means:
            p.copy_(means[name])


def combine_outputs(outputs: Sequence[np.ndarray], *, label_kind: str,
                    vote: str = "majority") -> np.ndarray:
    """Combine per-member outputs into one prediction.

    outputs: one array per member, (n, C) logits for classification or (n,) values.
    Returns (n, C) class scores: vote shares (``vote='majority'``; each row sums to 1)
    or mean softmax probabilities (``'mean'``, or always with a single member); (n,)
    mean values for regression.
    """
    if not outputs:
        raise ValueError("Expected outputs of at least one member; got none.")
    if label_kind == "regression":
        return np.mean(np.stack(outputs), axis=0)
    if label_kind != "classification":
        raise ValueError(f"'label_kind' must be 'classification' or 'regression'; got "
                         f"{label_kind!r}.")
    if vote not in VOTES:
        raise ValueError(f"'vote' must be one of {list(VOTES)}; got {vote!r}.")
    logits = np.stack(outputs).astype(np.float64)  # (M, n, C)
    if vote == "mean" or len(outputs) == 1:
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        return probs.mean(0)
    counts = np.zeros(logits.shape[1:])
    np.add.at(counts, (np.arange(logits.shape[1])[None, :].repeat(len(outputs), 0),
                       logits.argmax(-1)), 1.0)
    return counts / len(outputs)


def combine_labels(outputs: Sequence[np.ndarray], *, vote: str = "majority") -> np.ndarray:
    """Predicted classes (n,) from per-member logits: the vote winner, ties broken by the
    higher mean probability (then the lower class index)."""
    scores = combine_outputs(outputs, label_kind="classification", vote=vote)
    if vote == "mean" or len(outputs) == 1:
        return scores.argmax(1)
    mean_p = combine_outputs(outputs, label_kind="classification", vote="mean")
    tied = scores == scores.max(1, keepdims=True)
    return np.where(tied, mean_p, -np.inf).argmax(1)


def member_seed(seed: int, index: int) -> int:
    """Seed of ensemble member ``index`` (0 keeps ``seed``; others from a SeedSequence,
    so that runs with seeds s and s+1 share no member)."""
    if index == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] >> 1)


# -- the result ----------------------------------------------------------------------------
@dataclass
class StabilizedModel:
    """A stabilised fine-tuning run: its models, cost and how it predicts.

    ``model``: the one model for forgetting/drift analysis, always the ``model``
    passed to :func:`train_stabilized` (trained in place) and ``members[0]``: the
    trained model (``none``), the SWA average loaded into it (``swa``), the seed-run
    member 0 (``ensemble``), the main model (``deni``: the averaged model, trained
    to the end as member 0 of the delayed ensemble on the standard schedule).
    ``members``: the models that vote. ``model_steps``: optimizer steps summed over
    all models trained (the cost measure). ``losses``: the main model's per-step
    loss. ``schedule``: the DENI events (``deni`` only). ``warnings``: phases that
    could not run (also logged).
    """

    kind: str
    label_kind: str
    model: TaskModel
    members: list[TaskModel]
    model_steps: int
    seconds: float
    losses: list[float]
    vote: str = "majority"
    schedule: DeniSchedule | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in STABILIZERS:
            raise ValueError(f"'kind' must be one of {list(STABILIZERS)}; got {self.kind!r}.")
        if not self.members or self.members[0] is not self.model:
            raise ValueError("Expected 'members' to start with 'model'; got "
                             f"{len(self.members)} member(s) without it first.")
        if self.model_steps < len(self.losses):
            raise ValueError(f"Expected model_steps >= main-model steps {len(self.losses)}; "
                             f"got {self.model_steps}.")

    @property
    def steps(self) -> int:
        """Main-model optimizer steps."""
        return len(self.losses)

    def member_outputs(self, split: Split, *, batch_size: int = 64) -> list[np.ndarray]:
        """Each member's raw outputs: (n, C) logits or (n,) values."""
        return [predict(m, split, batch_size=batch_size) for m in self.members]

    def predict(self, split: Split, *, batch_size: int = 64) -> np.ndarray:
        """(n, C) class scores (vote shares, or mean probabilities with ``vote='mean'`` or a
        single member), or (n,) mean values for regression."""
        return combine_outputs(self.member_outputs(split, batch_size=batch_size),
                               label_kind=self.label_kind, vote=self.vote)

    def evaluate(self, task: Task, split: Split | None = None) -> dict[str, float]:
        """Metrics of the combined prediction
        (:func:`stepstone.finetune.train.metrics_from_outputs`) on ``split`` (default: the
        task's test split)."""
        if task.label_kind != self.label_kind:
            raise ValueError(f"Expected a {self.label_kind} task; got {task.label_kind!r} "
                             f"({task.task_id}).")
        split = split if split is not None else task.test
        outputs = self.member_outputs(split)
        if self.label_kind == "classification":
            pred = combine_labels(outputs, vote=self.vote)
        else:
            pred = combine_outputs(outputs, label_kind="regression")
        return metrics_from_outputs(pred, split.labels, self.label_kind)

    def to_dict(self) -> dict:
        """JSON-able summary (no weights)."""
        return {"kind": self.kind, "members": len(self.members), "vote": self.vote,
                "steps": self.steps, "model_steps": self.model_steps, "seconds": self.seconds,
                "schedule": self.schedule.to_dict() if self.schedule is not None else None,
                "warnings": list(self.warnings)}

    def __str__(self) -> str:
        return (f"StabilizedModel({self.kind}, {len(self.members)} member(s), "
                f"{self.steps} steps, {self.model_steps} model-steps, {self.seconds:.1f}s)")


# -- training ------------------------------------------------------------------------------
def train_stabilized(
    model: TaskModel,
    split: Split,
    *,
    label_kind: str,
    settings: FinetuneSettings,
    stabilizer: StabilizerSettings,
    lr_distribution: str | Mapping[str, float] | None = None,
    progress: bool = True,
    desc: str = "fine-tuning",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
) -> StabilizedModel:
    """Fine-tune ``model`` on ``split`` with a stabiliser (module docstring).

    ``model`` is trained in place and is the main model (``StabilizedModel.model``);
    other members are copies. Every kind trains in the one loop,
    :func:`stepstone.finetune.train.finetune` (``none`` calls it unchanged; ``swa`` and
    ``deni`` add :class:`SwaCallback` / :class:`DeniCallback`; ``ensemble`` runs it once
    per member), with its ``settings``, ``lr_distribution`` and checkpoints: the SWA
    average and the DENI copies are part of the checkpoint; an ensemble checkpoints
    each member in ``member-<i>/`` (members finished before a crash train again, to the
    same weights).
    """
    run = dict(label_kind=label_kind, settings=settings, lr_distribution=lr_distribution,
               progress=progress, checkpoint_every=checkpoint_every)
    if stabilizer.kind == "ensemble":
        return _train_ensemble(model, split, stabilizer=stabilizer, desc=desc,
                               checkpoint_dir=checkpoint_dir, **run)
    callbacks: list[SwaCallback | DeniCallback] = []
    if stabilizer.kind == "swa":
        callbacks.append(SwaCallback(stabilizer))
    elif stabilizer.kind == "deni":
        callbacks.append(DeniCallback(stabilizer))
    result = finetune(model, split, desc=desc if not callbacks else f"{desc} ({stabilizer.kind})",
                      checkpoint_dir=checkpoint_dir, callbacks=callbacks, **run)
    members, schedule, warnings = [model], None, []
    if stabilizer.kind == "swa":
        warnings = list(callbacks[0].warnings)
    elif stabilizer.kind == "deni":
        deni = callbacks[0]
        members += [c for c, _ in deni.copies]
        schedule, warnings = deni.schedule, list(deni.schedule.warnings)
    return StabilizedModel(stabilizer.kind, label_kind, model, members, result.model_steps,
                           result.seconds, result.losses, stabilizer.vote, schedule=schedule,
                           warnings=warnings)


def _train_ensemble(model, split, *, label_kind, settings, stabilizer, lr_distribution,
                    progress, desc, checkpoint_dir, checkpoint_every) -> StabilizedModel:
    """M independent runs; member i > 0 is a copy of the untrained model whose head is
    re-initialised under :func:`member_seed` (also its batch-order/dropout seed)."""
    start = time.perf_counter()
    untrained = copy.deepcopy(model)
    members, steps, losses = [], 0, []
    m_total = stabilizer.members
    for i in tqdm(range(m_total), desc=f"{desc} (ensemble)", unit="member",
                  disable=not progress, leave=False):
        seed = member_seed(settings.seed, i)
        if i == 0:
            member = model
        else:
            member = copy.deepcopy(untrained)
            torch.manual_seed(seed)
            member.head.reset_parameters()
        result = finetune(member, split, label_kind=label_kind,
                          settings=dataclasses.replace(settings, seed=seed), progress=progress,
                          desc=f"{desc} member {i + 1}/{m_total}",
                          lr_distribution=lr_distribution,
                          checkpoint_dir=(None if checkpoint_dir is None
                                          else Path(checkpoint_dir) / f"member-{i}"),
                          checkpoint_every=checkpoint_every)
        members.append(member)
        steps += result.model_steps
        if i == 0:
            losses = result.losses
    return StabilizedModel("ensemble", label_kind, model, members, steps,
                           time.perf_counter() - start, losses, stabilizer.vote)


class SwaCallback(TrainCallback):
    """Stochastic weight averaging (Izmailov et al. 2018, arXiv 1803.05407) in the
    :func:`stepstone.finetune.train.finetune` loop.

    From ``swa_start`` of the steps the schedule hands over to SWALR
    (:class:`torch.optim.swa_utils.SWALR`, cosine-annealed to ``swa_lr_scale`` times
    each group's peak rate) and a running average
    (:class:`torch.optim.swa_utils.AveragedModel`) takes the weights after every
    ``swa_every``-th step and after the last; the average is loaded into the model at
    the end. No batch-norm statistics to recompute (transformers use LayerNorm).
    ``warnings``: set when no step is left after ``swa_start``.
    """

    def __init__(self, stabilizer: StabilizerSettings) -> None:
        self.stabilizer = stabilizer
        self.averaged: nn.Module | None = None
        self.scheduler = None
        self.start = 0
        self.warnings: list[str] = []

    def key(self) -> dict:
        s = self.stabilizer
        return {"callback": "swa", "swa_start": s.swa_start, "swa_lr_scale": s.swa_lr_scale,
                "swa_anneal": s.swa_anneal, "swa_every": s.swa_every}

    def on_train_begin(self, loop: TrainLoop) -> None:
        self.start = _boundary(self.stabilizer.swa_start, loop.total_steps)
        if self.start >= loop.total_steps:
            self.warnings.append(
                f"SWA: no step after swa_start={self.stabilizer.swa_start} of "
                f"{loop.total_steps} steps; the result is the last iterate, not an average.")
            logger.warning(self.warnings[-1])

    def _hand_over(self, loop: TrainLoop) -> None:
        from torch.optim.swa_utils import SWALR

        peak = [g.get("initial_lr", g["lr"]) for g in loop.optimizer.param_groups]
        self.scheduler = SWALR(
            loop.optimizer, swa_lr=[lr * self.stabilizer.swa_lr_scale for lr in peak],
            anneal_epochs=max(0, round(self.stabilizer.swa_anneal * loop.total_steps)),
            anneal_strategy="cos")
        loop.scheduler = self.scheduler

    def on_step_begin(self, loop: TrainLoop, inputs, targets) -> None:
        if loop.step == self.start < loop.total_steps:
            from torch.optim.swa_utils import AveragedModel

            self.averaged = AveragedModel(loop.model)
            self._hand_over(loop)

    def on_step_end(self, loop: TrainLoop, inputs, targets) -> None:
        if self.averaged is not None and ((loop.step - self.start) % self.stabilizer.swa_every
                                          == 0 or loop.step == loop.total_steps):
            self.averaged.update_parameters(loop.model)

    def on_train_end(self, loop: TrainLoop) -> None:
        if self.averaged is not None:
            with torch.no_grad():
                for p, q in zip(loop.model.parameters(), self.averaged.module.parameters(),
                                strict=True):
                    p.copy_(q)

    def state(self, loop: TrainLoop) -> tuple[dict[str, torch.Tensor], dict]:
        if self.averaged is None:
            return {}, {"started": False}
        return dict(self.averaged.state_dict()), {"started": True,
                                                  "scheduler": self.scheduler.state_dict()}

    def load_state(self, loop: TrainLoop, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if not meta["started"]:
            return
        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(loop.model)
        self.averaged.load_state_dict(tensors)
        # SWALR's constructor steps once; the checkpoint's learning rates are the truth.
        lrs = [g["lr"] for g in loop.optimizer.param_groups]
        self._hand_over(loop)
        self.scheduler.load_state_dict(meta["scheduler"])
        for g, lr in zip(loop.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr


def _make_copies(model: TaskModel, opt: torch.optim.Optimizer, event: DeniEvent, *,
                 count: int, names: list[str], generator: torch.Generator,
                 settings: FinetuneSettings, stabilizer: StabilizerSettings,
                 lr_distribution) -> list[tuple[TaskModel, torch.optim.Optimizer]]:
    copies = []
    for _ in range(count):
        c = copy.deepcopy(model)
        add_noise(c, event.noise, names=names, generator=generator)
        c_opt, _ = build_optimizer(c, settings, None, lr_distribution)
        if stabilizer.copy_lr == "current":
            for g_copy, g_main in zip(c_opt.param_groups, opt.param_groups, strict=True):
                g_copy["lr"] = g_main["lr"]
        c.train()
        copies.append((c, c_opt))
    return copies


class DeniCallback(TrainCallback):
    """DENI (Pecher et al. 2024, arXiv 2406.12471) in the
    :func:`stepstone.finetune.train.finetune` loop: the copies of :func:`deni_schedule`
    are made before their first step and train on the main model's batches right after
    it; interpolation copies are averaged into the main model at their round's end,
    the delayed ensemble's are kept in ``copies`` (members 1..M-1).
    """

    def __init__(self, stabilizer: StabilizerSettings) -> None:
        self.stabilizer = stabilizer
        self.copies: list[tuple[TaskModel, torch.optim.Optimizer]] = []
        self.current: DeniEvent | None = None

    def key(self) -> dict:
        return {"callback": "deni", **self.stabilizer.to_dict()}

    def on_train_begin(self, loop: TrainLoop) -> None:
        self.schedule = deni_schedule(loop.total_steps, self.stabilizer)
        for w in self.schedule.warnings:
            logger.warning(w)
        self.starts = {e.start: e for e in self.schedule.events}
        self.names = noise_parameter_names(loop.model, self.stabilizer.noise_scope)
        self.generator = torch.Generator().manual_seed(member_seed(loop.settings.seed,
                                                                   1_000_003))

    def on_step_begin(self, loop: TrainLoop, inputs, targets) -> None:
        if loop.step in self.starts:
            self.current = self.starts[loop.step]
            self.copies = _make_copies(
                loop.model, loop.optimizer, self.current, count=self.stabilizer.members - 1,
                names=self.names, generator=self.generator, settings=loop.settings,
                stabilizer=self.stabilizer, lr_distribution=loop.lr_distribution)

    def on_step_end(self, loop: TrainLoop, inputs, targets) -> None:
        for c, c_opt in self.copies:
            loop.train_step(c, c_opt, inputs, targets, step=loop.step,
                            what=f"{loop.desc}, DENI copy")
        if self.current is not None and self.current.kind == "interpolate" \
                and loop.step == self.current.end:
            average_into(loop.model, [loop.model, *(c for c, _ in self.copies)])
            self.copies, self.current = [], None

    def on_train_end(self, loop: TrainLoop) -> None:
        for c, _ in self.copies:
            c.eval()
            c.encoder.invalidate_fingerprint()
        expected = self.schedule.model_steps(self.stabilizer.members)
        if loop.model_steps != expected:  # the schedule and the loop must agree on the cost
            raise TrainingError(f"DENI ran {loop.model_steps} model-steps; its schedule "
                                f"expected {expected}.")

    def state(self, loop: TrainLoop) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"generator": self.generator.get_state()}
        optimizers = []
        for i, (c, c_opt) in enumerate(self.copies):
            tensors.update({f"copy.{i}.model.{k}": v for k, v in c.state_dict().items()})
            flat, meta = optimizer_to_flat(c_opt)
            tensors.update({f"copy.{i}.optimizer.{k}": v for k, v in flat.items()})
            optimizers.append(meta)
        return tensors, {"event": None if self.current is None else self.current.start,
                         "optimizers": optimizers}

    def load_state(self, loop: TrainLoop, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.generator.set_state(tensors["generator"])
        self.current = None if meta["event"] is None else self.starts[meta["event"]]
        self.copies = []

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        for i, opt_meta in enumerate(meta["optimizers"]):
            c = copy.deepcopy(loop.model)
            c.load_state_dict(part(f"copy.{i}.model."))
            c_opt, _ = build_optimizer(c, loop.settings, None, loop.lr_distribution)
            c_opt.load_state_dict(optimizer_from_flat(part(f"copy.{i}.optimizer."), opt_meta))
            c.train()
            self.copies.append((c, c_opt))
