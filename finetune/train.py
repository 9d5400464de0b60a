"""Fine-tuning an encoder with a fresh task head, and evaluating it.

The loop is deliberately plain PyTorch: AdamW, linear decay, gradient clipping,
length-grouped batches with dynamic padding, a progress bar, and an early stop
with a clear message when the loss turns NaN. With a checkpoint folder the run
saves its full state (weights, optimizer, scheduler, RNGs, position in the epoch,
and the state of its callbacks) every few steps, and a killed run resumes from
there to the same final weights.

It is the only training loop: variants hook into it with :class:`TrainCallback`
(per-step and per-run hooks that may train copies beside the main model or swap
its schedule; SWA and DENI in :mod:`stepstone.finetune.stabilize` are callbacks).

:class:`TaskModel` and its folder format (:func:`save_task_model`,
:func:`load_task_model`) live in :mod:`stepstone.esm.taskmodel` and are re-exported here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from stepstone.esm.atomic import OLD_SUFFIX, TMP_SUFFIX, atomic_path
from stepstone.esm.data import Split, Task
from stepstone.esm.encoder import Encoder
from stepstone.esm.errors import ConfigError, StepstoneError
from stepstone.esm.taskmodel import (  # noqa: F401
    TASK_MODEL_ENCODER,
    TASK_MODEL_HEAD,
    TASK_MODEL_META,
    TaskModel,
    load_task_model,
    metrics_from_outputs,
    save_task_model,
)
from stepstone.finetune.lr import NO_DECAY, layer_groups, param_groups, resolve_distribution

logger = logging.getLogger(__name__)

CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_OPTIM = "optimizer.safetensors"
CHECKPOINT_CALLBACKS = "callbacks.safetensors"
CHECKPOINT_FORMAT = 1


class TrainingError(StepstoneError, RuntimeError):
    """Training diverged (NaN/inf loss) or cannot start."""


@dataclass
class FinetuneSettings:
    """Fine-tuning hyper-parameters (defaults: the ESM paper's source fine-tuning)."""

    lr: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    epochs: int = field(default=3, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=32, metadata={"help": "Examples per step."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps to warm up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the head."})
    seed: int = field(default=0, metadata={"help": "Seed for the head init and batch order."})

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"Need lr > 0, epochs >= 1, batch_size >= 1; got lr={self.lr}, "
                              f"epochs={self.epochs}, batch_size={self.batch_size}.")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'warmup_ratio' and 'dropout' must be in [0, 1); got "
                              f"{self.warmup_ratio}, {self.dropout}.")

    def to_dict(self) -> dict:
        return asdict(self)


# -- data -------------------------------------------------------------------------------
def _length_grouped_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator
                          ) -> np.ndarray:
    """Shuffled order whose consecutive batches have similar lengths (less padding)."""
    perm = rng.permutation(len(lengths))
    mega = batch_size * 50
    chunks = [perm[i:i + mega] for i in range(0, len(perm), mega)]
    chunks = [c[np.argsort(-lengths[c], kind="stable")] for c in chunks]
    batches = [b for c in chunks for b in np.array_split(c, max(1, math.ceil(len(c) / batch_size)))]
    rng.shuffle(batches)
    return np.concatenate(batches) if batches else perm


class TrainingData:
    """A split tokenised once, served as length-grouped shuffled batches.

    ``epoch_order(rng)`` draws one epoch's example order; ``batches(order)`` yields
    ``(indices, inputs, targets)`` with inputs padded to the batch's longest text,
    all on the model's device (:meth:`~stepstone.esm.encoder.Encoder.batches`).
    """

    def __init__(self, encoder: Encoder, split: Split, *, label_kind: str,
                 batch_size: int) -> None:
        if label_kind not in ("classification", "regression"):
            raise ValueError(f"'label_kind' must be 'classification' or 'regression'; got "
                             f"{label_kind!r}.")
        if len(split) == 0:
            raise TrainingError("Cannot fine-tune on an empty split.")
        self.encoder = encoder
        self.label_kind = label_kind
        self.batch_size = batch_size
        self.n = len(split)
        self.encoded = encoder.tokenize(split.inputs())
        self.lengths = np.array([len(x) for x in self.encoded["input_ids"]])
        dtype = torch.long if label_kind == "classification" else torch.float32
        self.labels = torch.as_tensor(split.labels, dtype=dtype)
        self.split_hash = hashlib.sha256(
            json.dumps([list(map(str, split.inputs())), np.asarray(split.labels).tolist()])
            .encode()).hexdigest()[:16]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        return _length_grouped_order(self.lengths, self.batch_size, rng)

    def batches(self, order: np.ndarray
                ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor]]:
        for idx, inputs in self.encoder.batches(self.encoded, self.batch_size, order=order):
            yield idx, inputs, self.labels[torch.as_tensor(idx)].to(self.encoder.device)


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, label_kind: str) -> torch.Tensor:
    """Cross-entropy on logits (classification) or MSE on one output (regression)."""
    if label_kind == "regression":
        return nn.functional.mse_loss(outputs.squeeze(-1), targets)
    return nn.functional.cross_entropy(outputs, targets)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not n.endswith(NO_DECAY)],
             "weight_decay": weight_decay},
            {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0}]


def optimizer_groups(model: nn.Module, settings: FinetuneSettings,
                     lr_distribution: str | Mapping[str, float] | None = None) -> list[dict]:
    """AdamW parameter groups: ``settings.lr`` everywhere, or a layer-wise distribution
    (``flat:LR``, ``llrd:LR,DECAY``, ``kenneweg``, a JSON file; :mod:`stepstone.finetune.lr`)."""
    if lr_distribution is None:
        return _decay_groups(model, settings.weight_decay)
    layers = layer_groups(model)
    return param_groups(model, resolve_distribution(lr_distribution, layers), layers,
                        weight_decay=settings.weight_decay)


def linear_schedule(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for 0-based optimizer step ``step``:
    ``(step + 1) / warmup`` while ``step < warmup``, then linear decay
    ``(total - step) / (total - warmup)`` to 0.

    ``transformers.get_linear_schedule_with_warmup`` gives the same factors when
    ``warmup == 0`` but warms up one step later (factor 0 at step 0), so it would change
    every run with ``warmup_ratio > 0``; this formula is kept (tests/finetune/test_train.py
    pins both facts).
    """
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(model: nn.Module, settings: FinetuneSettings, total_steps: int | None,
                    lr_distribution: str | Mapping[str, float] | None = None):
    """AdamW over ``model``'s trainable parameters, and its schedule.

    Returns ``(optimizer, scheduler)``: :func:`linear_schedule` with warm-up for
    ``warmup_ratio`` of ``total_steps``; ``scheduler`` is None when ``total_steps`` is
    None (constant learning rates).
    """
    opt = torch.optim.AdamW(optimizer_groups(model, settings, lr_distribution), lr=settings.lr)
    if total_steps is None:
        return opt, None
    warmup = int(total_steps * settings.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(linear_schedule, warmup=warmup, total=total_steps))
    return opt, sched


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: dict[str, torch.Tensor],
               targets: torch.Tensor, *, label_kind: str, max_grad_norm: float) -> float:
    """One forward/backward/clip/step; returns the loss. Raises on a NaN/inf loss."""
    outputs = model(inputs)
    loss = task_loss(outputs, targets.to(outputs.device), label_kind)
    if not torch.isfinite(loss):
        raise TrainingError(f"Loss became {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                   max_grad_norm)
    opt.step()
    return loss.item()


# -- checkpoints ------------------------------------------------------------------------
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors (for safetensors) and JSON-able metadata."""
    state = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().clone().contiguous()
               for i, s in state["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    scalars = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()
               if not isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ``state_dict`` :func:`optimizer_to_flat` flattened."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = value
    for key, value in meta["scalars"].items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_checkpoint(folder: Path, model: nn.Module, opt, sched, state: dict,
                      extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the full training state atomically: to ``folder.tmp``, then swap in.

    ``extra``: the callbacks' tensors (:data:`CHECKPOINT_CALLBACKS`)."""
    from safetensors.torch import save_file

    tensors, meta = optimizer_to_flat(opt)
    tensors["torch_rng_state"] = torch.get_rng_state()
    state = {**state, "optimizer": meta,
             "scheduler": sched.state_dict() if sched is not None else None}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / CHECKPOINT_MODEL))
        save_file(tensors, str(tmp / CHECKPOINT_OPTIM))
        if extra:
            save_file({k: v.detach().clone().contiguous() for k, v in extra.items()},
                      str(tmp / CHECKPOINT_CALLBACKS))
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))


def _read_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint (``folder`` or, after a crash mid-swap, ``.old``)."""
    for cand in (folder, folder.with_name(folder.name + OLD_SUFFIX)):
        if (cand / CHECKPOINT_STATE).is_file() and (cand / CHECKPOINT_OPTIM).is_file():
            return cand, json.loads((cand / CHECKPOINT_STATE).read_text())
    return None


def clear_checkpoint(folder: str | Path) -> None:
    """Remove a training checkpoint (and any half-swapped copies)."""
    folder = Path(folder)
    for cand in (folder, folder.with_name(folder.name + OLD_SUFFIX),
                 folder.with_name(folder.name + TMP_SUFFIX)):
        shutil.rmtree(cand, ignore_errors=True)


# -- the loop ---------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a fine-tuning run did.

    ``losses``: training loss per main-model step; ``epoch_metrics``: what
    ``on_epoch_end`` returned after each epoch; ``resumed_at``: the step a checkpoint
    resumed from; ``model_steps``: optimizer steps over every model trained (the main
    model's plus those of copies that callbacks train beside it).
    """

    steps: int
    seconds: float
    losses: list[float]
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    resumed_at: int | None = None
    model_steps: int = 0


EpochCallback = Callable[[int, "TaskModel"], "dict[str, float] | None"]


class TrainLoop:
    """A running :func:`finetune` loop, as its callbacks see it.

    ``model``, ``optimizer``, ``settings``, ``label_kind``, ``lr_distribution``,
    ``total_steps`` and ``desc`` are the run's; ``losses`` holds one loss per main-model
    step done (``step`` counts them). ``scheduler`` is stepped after every main-model
    step; a callback may replace it (SWA hands over to SWALR). ``model_steps`` counts
    optimizer steps over all models (:meth:`train_step` adds to it).
    """

    def __init__(self, model: TaskModel, optimizer: torch.optim.Optimizer, scheduler, *,
                 settings: FinetuneSettings, label_kind: str,
                 lr_distribution: str | Mapping[str, float] | None, total_steps: int,
                 desc: str) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.settings = settings
        self.label_kind = label_kind
        self.lr_distribution = lr_distribution
        self.total_steps = total_steps
        self.desc = desc
        self.losses: list[float] = []
        self.model_steps = 0

    @property
    def step(self) -> int:
        """Main-model optimizer steps completed."""
        return len(self.losses)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                   inputs: dict[str, torch.Tensor], targets: torch.Tensor, *,
                   step: int, what: str | None = None) -> float:
        """:func:`train_step` for the main model or a copy, counted in ``model_steps``;
        a NaN/inf loss stops the run, naming the 1-based main-model ``step``."""
        try:
            loss = train_step(model, optimizer, inputs, targets, label_kind=self.label_kind,
                              max_grad_norm=self.settings.max_grad_norm)
        except TrainingError as err:
            raise TrainingError(
                f"{err} at step {step} of {self.total_steps} ({what or self.desc}); stopped. "
                f"Try a lower learning rate than {self.settings.lr}.") from None
        self.model_steps += 1
        return loss


class TrainCallback:
    """Hooks into :func:`finetune`'s loop; every method is optional.

    Order per step: ``on_step_begin``, the main model's optimizer step, the scheduler
    step, ``on_step_end`` (all callbacks in the order given). ``key`` enters the run id,
    so a checkpoint resumes only under the same callbacks; ``state``/``load_state``
    save and restore what the callback holds (tensors go to safetensors, ``meta`` must
    be JSON-able), so a resumed run ends as the uninterrupted one.
    """

    def key(self) -> dict[str, Any]:
        return {"callback": type(self).__name__}

    def on_train_begin(self, loop: TrainLoop) -> None:
        """Before the first step (and before a checkpoint's state is loaded)."""

    def on_step_begin(self, loop: TrainLoop, inputs: dict[str, torch.Tensor],
                      targets: torch.Tensor) -> None:
        """Before main-model step ``loop.step + 1``."""

    def on_step_end(self, loop: TrainLoop, inputs: dict[str, torch.Tensor],
                    targets: torch.Tensor) -> None:
        """After main-model step ``loop.step`` and its scheduler step."""

    def on_train_end(self, loop: TrainLoop) -> None:
        """After the last step, before the model goes to eval mode."""

    def state(self, loop: TrainLoop) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state(self, loop: TrainLoop, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned (after the loop's own state)."""


def finetune(
    model: TaskModel,
    split: Split,
    *,
    label_kind: str,
    settings: FinetuneSettings | None = None,
    progress: bool = True,
    desc: str = "fine-tuning",
    lr_distribution: str | Mapping[str, float] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    on_epoch_end: EpochCallback | None = None,
    callbacks: Sequence[TrainCallback] = (),
) -> TrainResult:
    """Fine-tune ``model`` (encoder and head) on ``split`` in place.

    ``lr_distribution``: a layer-wise learning-rate spec (``flat:LR``,
    ``llrd:LR,DECAY``, ``kenneweg``, a JSON file; see :mod:`stepstone.finetune.lr`); by
    default every parameter uses ``settings.lr``.

    ``checkpoint_dir``: save the full training state there every
    ``checkpoint_every`` steps and resume from it when it exists (the resumed run
    ends with the same weights as an uninterrupted one); removed on success. A
    checkpoint written by a different run (other settings, data or callbacks) is an
    error.

    ``on_epoch_end(epoch, model)``: called with the model in eval mode after each
    epoch; the dicts it returns are kept in ``TrainResult.epoch_metrics`` (learning
    curves). Exceptions it raises (e.g. a pruned optuna trial) propagate.

    ``callbacks``: :class:`TrainCallback` hooks (SWA, DENI); none for plain fine-tuning.
    """
    settings = settings or FinetuneSettings()
    if checkpoint_every < 1:
        raise ConfigError(f"'checkpoint_every' must be >= 1; got {checkpoint_every}.")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    data = TrainingData(model.encoder, split, label_kind=label_kind,
                        batch_size=settings.batch_size)
    total = data.steps_per_epoch * settings.epochs
    opt, sched = build_optimizer(model, settings, total, lr_distribution)
    run = {"settings": settings.to_dict(), "lr": lr_distribution, "data": data.split_hash,
           "kind": label_kind, "head": model.head.out_features}
    if callbacks:  # absent for plain runs, so their run ids stay as they were
        run["callbacks"] = [cb.key() for cb in callbacks]
    run_id = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    loop = TrainLoop(model, opt, sched, settings=settings, label_kind=label_kind,
                     lr_distribution=lr_distribution, total_steps=total, desc=desc)
    for cb in callbacks:
        cb.on_train_begin(loop)

    epoch_metrics: list[dict[str, float]] = []
    start_epoch, skip, resumed_at, order = 0, 0, None, None
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    found = _read_checkpoint(folder) if folder is not None else None
    if found is not None:
        where, state = found
        if state.get("format") != CHECKPOINT_FORMAT or state.get("run_id") != run_id:
            raise TrainingError(
                f"The checkpoint in {where} was written by a different run (other settings, "
                f"LR distribution, data or callbacks); remove it or use another checkpoint "
                f"folder.")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(where / CHECKPOINT_MODEL)))
        tensors = load_file(str(where / CHECKPOINT_OPTIM))
        torch.set_rng_state(tensors.pop("torch_rng_state"))
        opt.load_state_dict(optimizer_from_flat(tensors, state["optimizer"]))
        if sched is not None and state["scheduler"] is not None:
            sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["np_rng"]
        loop.losses, epoch_metrics = state["losses"], state["epoch_metrics"]
        loop.model_steps = state.get("model_steps", len(loop.losses))
        extra = (load_file(str(where / CHECKPOINT_CALLBACKS))
                 if (where / CHECKPOINT_CALLBACKS).is_file() else {})
        for i, (cb, meta) in enumerate(zip(callbacks, state.get("callbacks", []),
                                           strict=True)):
            prefix = f"{i}."
            cb.load_state(loop, {k[len(prefix):]: v for k, v in extra.items()
                                 if k.startswith(prefix)}, meta)
        start_epoch, skip = state["epoch"], state["batch_in_epoch"]
        order = np.asarray(state["order"], dtype=np.int64)
        resumed_at = loop.step
        logger.info("Resuming %s from step %d of %d (%s).", desc, resumed_at, total, where)

    def save(epoch: int, batch_in_epoch: int) -> None:
        extra: dict[str, torch.Tensor] = {}
        metas = []
        for i, cb in enumerate(callbacks):
            tensors, meta = cb.state(loop)
            extra.update({f"{i}.{k}": v for k, v in tensors.items()})
            metas.append(meta)
        _write_checkpoint(folder, model, opt, sched, {
            "format": CHECKPOINT_FORMAT, "run_id": run_id, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "order": order.tolist(),
            "np_rng": rng.bit_generator.state, "losses": loop.losses,
            "epoch_metrics": epoch_metrics, "model_steps": loop.model_steps,
            "callbacks": metas}, extra)

    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, initial=loop.step, desc=desc, unit="step", disable=not progress,
               leave=False)
    try:
        for epoch in range(start_epoch, settings.epochs):
            if order is None:
                order = data.epoch_order(rng)
            # batches are consecutive slices of the order: a resumed epoch skips the done ones
            for b, (_, inputs, targets) in enumerate(
                    data.batches(order[skip * data.batch_size:]), start=skip):
                for cb in callbacks:
                    cb.on_step_begin(loop, inputs, targets)
                loss = loop.train_step(model, opt, inputs, targets, step=loop.step + 1)
                if loop.scheduler is not None:
                    loop.scheduler.step()
                loop.losses.append(loss)
                for cb in callbacks:
                    cb.on_step_end(loop, inputs, targets)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(loop.losses[-20:]):.4f}")
                if folder is not None and loop.step % checkpoint_every == 0 \
                        and loop.step < total:
                    save(epoch, b + 1)
            order, skip = None, 0
            if on_epoch_end is not None:
                model.eval()
                epoch_metrics.append(dict(on_epoch_end(epoch, model) or {}))
                model.train()
        for cb in callbacks:
            cb.on_train_end(loop)
    finally:
        bar.close()
        model.eval()
        model.encoder.invalidate_fingerprint()
    if folder is not None:
        clear_checkpoint(folder)
    return TrainResult(loop.step, time.perf_counter() - start, loop.losses, epoch_metrics,
                       resumed_at, loop.model_steps)


@torch.inference_mode()
def predict(model: TaskModel, split: Split, *, batch_size: int = 64) -> np.ndarray:
    """Model outputs for a split: (n, num_labels) logits or (n,) regression values."""
    model.eval()
    out = np.empty((len(split), model.head.out_features), dtype=np.float32)
    for idx, batch in model.encoder.batches(split.inputs(), batch_size, order="longest_first"):
        out[idx] = model(batch).float().cpu().numpy()
    return out[:, 0] if model.head.out_features == 1 else out


def evaluate(model: TaskModel, task: Task, split: Split | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 (classification) or MSE and Pearson r (regression)."""
    split = split or task.test
    return metrics_from_outputs(predict(model, split), split.labels, task.label_kind)


PRIMARY_METRIC = {"classification": "accuracy", "regression": "pearson"}
