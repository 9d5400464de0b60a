"""eNTK prediction beside real fine-tuning (``stepstone kernel``).

Malladi, Wettig, Yu, Chen, Arora, "A Kernel-Based View of Language Model
Fine-Tuning", ICML 2023 (arXiv 2210.05643): few-shot fine-tuning often behaves like
kernel regression with the model's empirical NTK at its starting point.
:func:`kernel_vs_finetune` puts the kernel-predicted accuracy beside real fine-tuning
on the same few-shot sample; :func:`source_encoder` gives the encoder after an
intermediate task to take the kernel of.

The kernel itself (:func:`~stepstone.selection.entk.compute_kernel`), its
formulations (:mod:`stepstone.selection.entk_formulations`) and solvers
(:mod:`stepstone.selection.entk_solvers`) live in the selection layer, beside the
``kernel`` rank method (:class:`stepstone.selection.scorers.KernelScorer`), which needs
no training.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stepstone.esm.data import Task
from stepstone.esm.encoder import Encoder
from stepstone.esm.taskmodel import TaskModel, metrics_from_outputs
from stepstone.finetune.train import FinetuneSettings, evaluate, finetune
from stepstone.selection.entk import KernelError, compute_kernel
from stepstone.selection.entk_formulations import ClassifierFormulation
from stepstone.selection.entk_solvers import KernelSettings, few_shot, solve

logger = logging.getLogger(__name__)


@dataclass
class FewShotFinetuneSettings(FinetuneSettings):
    """Fine-tuning for the kernel comparison: small batches and enough steps to move a
    fresh head (the registry's source defaults would take 1-3 steps on 32 examples)."""

    lr: float = field(default=5e-5, metadata={"help": "AdamW peak learning rate."})
    epochs: int = field(default=10, metadata={"help": "Passes over the few-shot sample."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})


FEW_SHOT_FINETUNE = FewShotFinetuneSettings()


@dataclass
class KernelReport:
    """Kernel-predicted vs actual fine-tuning metrics on one few-shot sample."""

    target: str
    source: str | None
    shots: int
    seed: int
    num_train: int
    num_eval: int
    settings: dict[str, Any]
    kernel_metrics: dict[str, float]
    finetune_metrics: dict[str, float] | None
    initial_metrics: dict[str, float]
    timings: dict[str, float]
    num_params: int
    held_gradient_mb: float
    finetune_settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_eval < 1:
            raise ValueError(f"A report needs train and eval examples; got {self.num_train}, "
                             f"{self.num_eval}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_pandas(self):
        import pandas as pd

        rows = [{"model": "kernel (eNTK)", **self.kernel_metrics},
                {"model": "initial model f0", **self.initial_metrics}]
        if self.finetune_metrics is not None:
            rows.append({"model": "fine-tuned", **self.finetune_metrics})
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        s = self.settings
        src = f" after {self.source}" if self.source else ""
        lines = [f"eNTK vs fine-tuning for {self.target}{src}: {self.shots} shots/class "
                 f"({self.num_train} train), {self.num_eval} eval, seed {self.seed}",
                 f"kernel {s['kernel']}, params {s['params']} (head "
                 f"{'in' if s['include_head'] else 'out'}, {self.num_params:,} parameters), "
                 f"solver {s['solver']}"]
        key = "accuracy" if "accuracy" in self.kernel_metrics else "mse"
        other = "macro_f1" if key == "accuracy" else "pearson"
        lines.append(f"  {'':<22}{key:>10}{other:>10}")
        rows = [("kernel-predicted", self.kernel_metrics), ("initial model", self.initial_metrics)]
        if self.finetune_metrics is not None:
            rows.append(("fine-tuned (actual)", self.finetune_metrics))
        lines += [f"  {name:<22}{m[key]:>10.4f}{m[other]:>10.4f}" for name, m in rows]
        t = self.timings
        lines.append(f"kernel {t['kernel']:.1f}s (held gradients {self.held_gradient_mb:.1f} "
                     f"MiB)" + (f", fine-tuning {t['finetune']:.1f}s" if "finetune" in t
                                else ""))
        return "\n".join(lines)


def kernel_vs_finetune(
    task: Task,
    encoder: Encoder,
    *,
    shots: int = 16,
    seed: int = 0,
    settings: KernelSettings | None = None,
    finetune_settings: FinetuneSettings | None = None,
    max_eval: int | None = 500,
    run_finetune: bool = True,
    source: str | None = None,
    progress: bool = True,
) -> KernelReport:
    """Kernel-predicted accuracy beside real fine-tuning, same sample, seed and start.

    ``shots`` examples per class are drawn from ``task.train`` (seeded); both are
    evaluated on ``task.test`` capped at ``max_eval`` (stratified). The head is
    initialised under ``torch.manual_seed(seed)``; fine-tuning runs on a copy of
    exactly that model with ``finetune_settings`` (default
    :data:`FEW_SHOT_FINETUNE`, its seed replaced by ``seed``). ``encoder`` is used
    as is (pass a source-tuned encoder to predict the transfer from that source).
    """
    settings = settings or KernelSettings()
    ft = dataclasses.replace(finetune_settings or FEW_SHOT_FINETUNE, seed=seed)
    train = few_shot(task.train, shots, label_kind=task.label_kind, seed=seed)
    evalset = task.subsample(max_test=max_eval, seed=seed).test
    torch.manual_seed(seed)
    model = TaskModel(encoder, task.num_labels, dropout=ft.dropout)
    start = copy.deepcopy(model) if run_finetune else None
    km = compute_kernel(ClassifierFormulation(model), train.inputs(), evalset.inputs(),
                        **settings.kernel_options(), progress=progress)
    t_solve = time.perf_counter()
    pred = solve(km, train.labels, label_kind=task.label_kind, settings=settings)
    timings = {"kernel": km.seconds, "solve": time.perf_counter() - t_solve}
    f0 = km.f0_eval[:, 0] if task.label_kind == "regression" else km.f0_eval
    ft_metrics = None
    if start is not None:
        t1 = time.perf_counter()
        finetune(start, train, label_kind=task.label_kind, settings=ft, progress=progress,
                 desc="fine-tuning (actual)")
        ft_metrics = evaluate(start, task, evalset)
        timings["finetune"] = time.perf_counter() - t1
    kind = task.label_kind
    return KernelReport(task.task_id, source, shots, seed, len(train), len(evalset),
                        settings.to_dict(), metrics_from_outputs(pred, evalset.labels, kind),
                        ft_metrics, metrics_from_outputs(f0, evalset.labels, kind),
                        {k: round(v, 3) for k, v in timings.items()}, km.num_params,
                        km.held_gradient_bytes / 2**20,
                        ft.to_dict() if run_finetune else None)


def source_encoder(
    source: str,
    encoder: Encoder,
    *,
    registry: str | None = None,
    max_examples: int = 500,
    settings: FinetuneSettings | None = None,
    progress: bool = True,
) -> Encoder:
    """The encoder after fine-tuning on ``source``, to take the eNTK of.

    ``source`` is an ESM id of ``registry`` (default: the shipped one) whose build
    kept the fine-tuned model (``--keep-models``), or a built-in task id (``trec6``
    or ``builtin:trec6``), which is fine-tuned here on at most ``max_examples``
    training examples with ``settings`` (default: the registry build's).

    Raises
    ------
    KernelError
        When the ESM has no kept model.
    """
    from stepstone.esm.catalog import builtin_ids, load_builtin
    from stepstone.esm.data import BUILTIN_PREFIX
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.registry import open_registry

    task_id = source.removeprefix(BUILTIN_PREFIX)
    if source.startswith(BUILTIN_PREFIX) or task_id in builtin_ids():
        task = load_builtin(task_id).subsample(max_train=max_examples, seed=0)
        tuned = encoder.copy()
        ft = settings or FinetuneSettings()
        torch.manual_seed(ft.seed)
        model = TaskModel(tuned, task.num_labels, dropout=ft.dropout)
        finetune(model, task.train, label_kind=task.label_kind, settings=ft, progress=progress,
                 desc=f"fine-tuning source {task_id}")
        return tuned
    reg = open_registry(registry)
    folder = reg.model_dir(source)
    if folder is None:
        raise KernelError(f"ESM {source!r} has no kept fine-tuned model (its registry was built "
                          "without --keep-models); pass a built-in task id to fine-tune the "
                          "source here instead.")
    return load_encoder(str(folder / "encoder"), pooling=encoder.pooling,
                        max_length=encoder.max_length, device=str(encoder.device))
