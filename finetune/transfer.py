"""The transfer pipeline: source → target fine-tuning, measured against no intermediate step.

For a target task and a source (given, or the top of :func:`stepstone.selection.ranking.rank`):

1. fine-tune the base encoder on the source, or reuse the source model a registry
   kept (``registry build --keep-models``);
2. fine-tune that encoder on the target with a fresh head, under each layer-wise
   learning-rate distribution asked for (:mod:`stepstone.finetune.lr`);
3. fine-tune the base encoder on the target alone with the same settings (the
   no-intermediate baseline);
4. measure target metrics and the transfer gain, source retention (its own head
   before/after, ΔS, ratio, BWT), a linear probe of the source task on the frozen
   encoders, per-layer weight drift and linear CKA from the pre-trained encoder;

per seed, then as mean ± std. Every finished stage is written to ``OUT/runs/`` at
once and training checkpoints go to ``OUT/checkpoints/``, so a killed run picks up
where it stopped when started again with the same arguments.

The source is resolved in :mod:`stepstone.finetune.transfer_source`; the results go
into a :class:`~stepstone.finetune.transfer_report.TransferReport`. The optional
optuna search for a layer-wise LR distribution (:func:`search_distribution`) is a
stage of the run and lives here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stepstone.esm.data import DataError, Split, Task
from stepstone.esm.encoder import Encoder
from stepstone.esm.errors import ConfigError
from stepstone.esm.leakage import overlap
from stepstone.esm.registry import Registry, open_registry
from stepstone.esm.sampling import holdout_indices, uniform_indices
from stepstone.esm.specs import load_task
from stepstone.esm.taskmodel import TaskModel, load_task_model, save_task_model
from stepstone.finetune.forgetting import (
    Retention,
    backward_transfer,
    layer_cka,
    linear_probe,
    weight_drift,
)
from stepstone.finetune.lr import layer_groups, resolve_distribution
from stepstone.finetune.stabilize import StabilizerSettings
from stepstone.finetune.train import (
    PRIMARY_METRIC,
    FinetuneSettings,
    evaluate,
    finetune,
    metrics_from_outputs,
    predict,
)
from stepstone.finetune.transfer_report import TransferReport, read_json, write_json
from stepstone.finetune.transfer_source import SourceChoice, choose_source
from stepstone.finetune.transfer_stats import prediction_profile

logger = logging.getLogger(__name__)

RUN_CONFIG = "transfer.json"
SEARCH_SPEC = "search"


class LeakageError(DataError):
    """The source holds texts of the target (see :mod:`stepstone.esm.leakage`)."""


@dataclass
class TransferSettings:
    """How a transfer run samples data and what it measures."""

    seeds: int = field(default=3, metadata={"help": "Training seeds (runs per distribution)."})
    first_seed: int = field(default=0, metadata={"help": "Seeds are first_seed, +1, ..."})
    source_max_examples: int | None = field(
        default=1000, metadata={"help": "Cap on source training examples (stratified)."})
    target_max_examples: int | None = field(
        default=500, metadata={"help": "Cap on target training examples (stratified)."})
    max_eval: int = field(
        default=1000, metadata={"help": "Cap on target and source test examples."})
    data_seed: int = field(
        default=0, metadata={"help": "Seed of the stratified caps (same data for all seeds)."})
    probe_examples: int = field(
        default=1000, metadata={"help": "Source training examples for the linear probe."})
    cka_examples: int = field(
        default=256, metadata={"help": "Target test texts for per-layer CKA."})
    curve_examples: int = field(
        default=300, metadata={"help": "Target test examples scored after each epoch."})
    checkpoint_every: int = field(
        default=100, metadata={"help": "Save the training state every N steps."})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep the fine-tuned source models in OUT."})
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"'seeds' must be >= 1; got {self.seeds}.")
        for name in ("max_eval", "probe_examples", "cka_examples", "curve_examples",
                     "checkpoint_every"):
            if getattr(self, name) < 2:
                raise ConfigError(f"'{name}' must be >= 2; got {getattr(self, name)}.")
        for name in ("source_max_examples", "target_max_examples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ConfigError(f"'{name}' must be >= 2 or None; got {value}.")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LRSearchSettings:
    """The optuna search for a per-group learning-rate distribution (``search``)."""

    trials: int = field(default=20, metadata={"help": "Trials to run (resumed ones count)."})
    timeout: float | None = field(
        default=None, metadata={"help": "Stop starting new trials after this many seconds."})
    retention_weight: float = field(
        default=1.0, metadata={"help": "Objective = target val metric + w * source retention."})
    lr_min: float = field(default=1e-6, metadata={"help": "Lowest per-group LR tried."})
    lr_max: float = field(default=2e-4, metadata={"help": "Highest per-group LR (head: 10x)."})
    validation_ratio: float = field(
        default=0.2, metadata={"help": "Share of target training data held out for the search."})
    source_eval_examples: int = field(
        default=300, metadata={"help": "Source test examples for retention during the search."})
    seed: int = field(default=0, metadata={"help": "Sampler seed."})

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError(f"'trials' must be >= 1; got {self.trials}.")
        if not 0 < self.lr_min < self.lr_max:
            raise ConfigError(f"Need 0 < lr_min < lr_max; got {self.lr_min}, {self.lr_max}.")
        if not 0 < self.validation_ratio < 0.9:
            raise ConfigError(f"'validation_ratio' must be in (0, 0.9); got "
                              f"{self.validation_ratio}.")


# -- small helpers ----------------------------------------------------------------------
def _slug(spec: str) -> str:
    """A folder-safe name for a distribution spec."""
    base = Path(spec).stem if spec.endswith(".json") else spec
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", base).strip("_") or "dist"


def _fresh_model(encoder: Encoder, num_labels: int, settings: FinetuneSettings) -> TaskModel:
    torch.manual_seed(settings.seed)  # the fresh head's init is part of the seed
    return TaskModel(encoder.copy(), num_labels, dropout=settings.dropout)


def _with_head(encoder: Encoder, head: torch.nn.Linear) -> TaskModel:
    """``encoder`` (shared, not copied) under a given head."""
    model = TaskModel(encoder, head.out_features)
    model.head = head
    return model.eval()


def _sample(split: Split, n: int, seed: int) -> Split:
    return split if len(split) <= n else split.take(uniform_indices(len(split), n, seed=seed))


def _validation_split(task: Task, ratio: float, seed: int) -> tuple[Split, Split]:
    """(train, validation) from the task's training split: the shared hold-out sampler
    (a ``ratio`` share of every class, each class of two or more rows on both sides)."""
    val = holdout_indices(task.train.labels, ratio, seed=seed, label_kind=task.label_kind)
    train = np.setdiff1d(np.arange(len(task.train)), val)
    return task.train.take(train), task.train.take(val)


# -- the pipeline -----------------------------------------------------------------------
class TransferRun:
    """One transfer run's state on disk (``out``) and its stages.

    Use :func:`transfer`; this class exists so the stages can be tested and resumed
    one by one.
    """

    def __init__(self, out: Path, *, target: Task, source: SourceChoice, encoder: Encoder,
                 settings: TransferSettings, distributions: Sequence[str],
                 stabilizer: StabilizerSettings | None = None, progress: bool = True) -> None:
        self.out = out
        self.target = target
        self.source = source
        self.encoder = encoder
        self.settings = settings
        self.specs = list(distributions)
        self.stabilizer = stabilizer if stabilizer and stabilizer.kind != "none" else None
        self.progress = progress
        self.metric = PRIMARY_METRIC[target.label_kind]
        self.source_metric = PRIMARY_METRIC[source.task.label_kind]
        rng = np.random.default_rng(settings.data_seed)
        self.cka_texts = _sample(target.test, settings.cka_examples,
                                 int(rng.integers(1 << 31))).inputs()
        self.curve_split = _sample(target.test, settings.curve_examples,
                                   int(rng.integers(1 << 31)))
        self.probe_train = _sample(source.task.train, settings.probe_examples,
                                   int(rng.integers(1 << 31)))

    # paths
    def stage_file(self, seed: int, name: str) -> Path:
        return self.out / "runs" / f"seed{seed}" / f"{name}.json"

    def checkpoint(self, seed: int, name: str) -> Path:
        return self.out / "checkpoints" / f"seed{seed}" / name

    def _ft(self, seed: int) -> FinetuneSettings:
        return dataclasses.replace(self.settings.finetune, seed=seed)

    def _curve(self, epoch: int, model: TaskModel) -> dict[str, float]:
        """Learning curve: the target metric on a fixed test sample after each epoch."""
        return {self.metric: evaluate(model, self.target, self.curve_split)[self.metric]}

    # stages
    def source_model(self, seed: int) -> tuple[TaskModel, dict[str, Any]]:
        """The source-tuned model for ``seed`` (kept by the registry, resumed, or trained)."""
        src = self.source
        if src.model_dir is not None:
            model = load_task_model(src.model_dir, name=self.encoder.name,
                                    device=self.encoder.device)
            if model.encoder.dim != self.encoder.dim:
                raise DataError(f"The kept source model of {src.esm_id} has dim "
                                f"{model.encoder.dim}; the encoder has {self.encoder.dim}.")
            record = read_json(self.stage_file(seed, "source"))
            if record is None:
                record = {"source_model": "registry", "seconds": 0.0, "losses": []}
                record.update(self._source_measures(model))
                write_json(self.stage_file(seed, "source"), record)
            return model, record
        folder = self.checkpoint(seed, "source-model")
        record = read_json(self.stage_file(seed, "source"))
        if record is not None and (folder / "head.json").is_file():
            return load_task_model(folder, name=self.encoder.name,
                                   device=self.encoder.device), record
        ft = self._ft(seed)
        model = _fresh_model(self.encoder, src.task.num_labels, ft)
        result = finetune(model, src.task.train, label_kind=src.task.label_kind, settings=ft,
                          progress=self.progress, desc=f"source {src.task.task_id} s{seed}",
                          checkpoint_dir=self.checkpoint(seed, "source-train"),
                          checkpoint_every=self.settings.checkpoint_every)
        save_task_model(model, folder, label_kind=src.task.label_kind,
                        classes=src.task.classes)
        record = {"source_model": "fine-tuned", "seconds": result.seconds,
                  "losses": result.losses}
        record.update(self._source_measures(model))
        write_json(self.stage_file(seed, "source"), record)
        return model, record

    def _source_measures(self, model: TaskModel) -> dict[str, Any]:
        task = self.source.task
        outputs = predict(model, task.test)
        return {"metrics": metrics_from_outputs(outputs, task.test.labels, task.label_kind),
                "predictions": prediction_profile(outputs, task.test.labels, task.label_kind),
                "probe": linear_probe(model.encoder, self.probe_train, task.test,
                                      label_kind=task.label_kind)}

    def target_stage(self, seed: int, spec: str, start: Encoder, name: str,
                     source_head: torch.nn.Linear | None) -> dict[str, Any]:
        """Fine-tune ``start`` on the target under ``spec``; measure; write the stage.

        With a stabiliser the target metrics are the stabilised prediction's (e.g. the
        ensemble vote) and forgetting/drift are measured on its main model.
        """
        path = self.stage_file(seed, f"{_slug(spec)}-{name}")
        done = read_json(path)
        if done is not None:
            return done
        ft = self._ft(seed)
        model = _fresh_model(start, self.target.num_labels, ft)
        desc = f"{name} {_slug(spec)} s{seed}"
        record: dict[str, Any]
        if self.stabilizer is None:
            result = finetune(model, self.target.train, label_kind=self.target.label_kind,
                              settings=ft, progress=self.progress, lr_distribution=spec,
                              desc=desc,
                              checkpoint_dir=self.checkpoint(seed, f"{_slug(spec)}-{name}"),
                              checkpoint_every=self.settings.checkpoint_every,
                              on_epoch_end=self._curve)
            test = self.target.test
            outputs = predict(model, test)  # evaluate(), keeping the outputs to profile
            record = {"metrics": metrics_from_outputs(outputs, test.labels,
                                                      self.target.label_kind),
                      "predictions": prediction_profile(outputs, test.labels,
                                                        self.target.label_kind),
                      "seconds": result.seconds, "losses": result.losses,
                      "epoch_metric": [m[self.metric] for m in result.epoch_metrics],
                      "model_steps": result.steps}
        else:
            from stepstone.finetune.stabilize import train_stabilized

            stable = train_stabilized(
                model, self.target.train, label_kind=self.target.label_kind, settings=ft,
                stabilizer=self.stabilizer, lr_distribution=spec, progress=self.progress,
                desc=desc, checkpoint_dir=self.checkpoint(seed, f"{_slug(spec)}-{name}"),
                checkpoint_every=self.settings.checkpoint_every)
            model = stable.model
            record = {"metrics": stable.evaluate(self.target, self.target.test),
                      "seconds": stable.seconds, "losses": stable.losses,
                      "epoch_metric": [], "model_steps": stable.model_steps,
                      "stabilizer": stable.to_dict()}
        record.update({
            "drift": weight_drift(self.encoder.model, model),
            "cka": layer_cka(self.encoder, model.encoder, self.cka_texts),
        })
        if source_head is not None:
            src = self.source.task
            record["source_after"] = evaluate(_with_head(model.encoder, source_head), src,
                                              src.test)
            record["probe_after"] = linear_probe(model.encoder, self.probe_train, src.test,
                                                 label_kind=src.label_kind)
        write_json(path, record)
        return record

    def combine(self, seed: int, spec: str, source: dict, tr: dict, base: dict
                ) -> dict[str, Any]:
        m, sm = self.metric, self.source_metric
        retention = Retention(source["metrics"][sm], tr["source_after"][sm])
        acc = np.array([[retention.before, 0.0], [retention.after, tr["metrics"][m]]])
        return {
            "seed": seed, "distribution": spec,
            "target": tr["metrics"][m], "baseline": base["metrics"][m],
            "gain": tr["metrics"][m] - base["metrics"][m],
            "target_metrics": tr["metrics"], "baseline_metrics": base["metrics"],
            "source_before": retention.before, "source_after": retention.after,
            "retention_delta": retention.delta, "retention_ratio": retention.ratio,
            "bwt": backward_transfer(acc),
            "probe_before": source["probe"], "probe_after": tr["probe_after"],
            "drift": {"transfer": tr["drift"], "baseline": base["drift"]},
            "cka": {"transfer": tr["cka"], "baseline": base["cka"]},
            "curves": {"source_loss": source["losses"], "transfer_loss": tr["losses"],
                       "baseline_loss": base["losses"],
                       "transfer_epoch_metric": tr["epoch_metric"],
                       "baseline_epoch_metric": base["epoch_metric"]},
            "seconds": {"source": source["seconds"], "target": tr["seconds"],
                        "baseline": base["seconds"]},
            "model_steps": {"target": tr.get("model_steps"),
                            "baseline": base.get("model_steps")},
            # absent in stage files written before predictions were profiled
            "predictions": {"source": source.get("predictions"),
                            "transfer": tr.get("predictions"),
                            "baseline": base.get("predictions")},
        }


def _check_out(out: Path) -> None:
    """Refuse an output folder that is a file or cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out must be a folder; {str(out)!r} is a file.")
    folder = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not folder.is_dir():
        raise ConfigError(f"--out {str(out)!r} cannot be created: {str(folder)!r} is a file.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(out)!r} cannot be written: no permission in "
                          f"{str(folder)!r}.")


# The caps that size what each summary measure is computed on: (option, setting).
_CAPS = {"target": ("--max-eval", "max_eval"), "baseline": ("--max-eval", "max_eval"),
         "source_before": ("--max-eval", "max_eval"), "source_after": ("--max-eval", "max_eval"),
         "retention_ratio": ("--max-eval", "max_eval"),
         "retention_delta": ("--max-eval", "max_eval"),
         "probe_before": ("--probe-examples", "probe_examples"),
         "probe_after": ("--probe-examples", "probe_examples")}


def _check_finite(rows: list[dict[str, Any]], settings: TransferSettings, source_test: int,
                  target_test: int) -> None:
    """Refuse to report NaN: name the measure, why it is undefined and the cap to raise."""
    for r in rows:
        for key, (flag, name) in _CAPS.items():
            if np.isfinite(r[key]):
                continue
            n = target_test if key in ("target", "baseline") else source_test
            if key == "retention_ratio" and r["source_before"] == 0:
                why = (f"the source model scored 0 on its {n} test examples, so after / "
                       "before is undefined")
            else:
                why = (f"it is undefined on {n} test examples (a constant prediction or a "
                       "test set of one class)")
            raise DataError(
                f"{key} is NaN for {r['distribution']} seed {r['seed']}: {why}. The test "
                f"sets are capped by {flag} {getattr(settings, name)}; raise it and run "
                "again with --overwrite, or into another --out.")


def _check_run_config(out: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """One output folder holds one run: refuse to mix results of different settings."""
    path = out / RUN_CONFIG
    old = read_json(path)
    if old is not None and old != config:
        if not overwrite:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise DataError(f"{out} holds a transfer run with other settings (differs in "
                            f"{changed}); use another --out, or --overwrite to discard it.")
        for sub in ("runs", "checkpoints", "lr_search"):
            shutil.rmtree(out / sub, ignore_errors=True)
    write_json(path, config)


def transfer(
    target: str | Task,
    source: str | Task = "auto",
    *,
    registry: str | Path | Registry | None = None,
    encoder: Encoder | str | None = None,
    lr_distributions: Sequence[str] | str | None = None,
    settings: TransferSettings | None = None,
    search: LRSearchSettings | None = None,
    out: str | Path = "transfer-out",
    method: str = "esm-logme",
    overwrite: bool = False,
    progress: bool = True,
    plots: bool = True,
    task_options: dict[str, Any] | None = None,
    stabilizer: StabilizerSettings | None = None,
    source_options: dict[str, Any] | None = None,
    allow_leakage: bool = False,
    force: bool = False,
) -> TransferReport:
    """Run the whole transfer for ``target`` and write the report to ``out``.

    Parameters
    ----------
    target : ``builtin:ID``, a file, a Hub name or a Task.
    source : ``auto`` (best of ``rank(target, registry, method)``), an ESM id or task id
        in the registry, or any task spec. ``auto`` follows the gain model's
        recommendation and raises :class:`~stepstone.selection.gain.NoSourceRecommended`
        when it expects no source to help, unless ``force`` (then: the top of the ranking).
    lr_distributions : one spec or several (compared side by side on the same source
        models): ``flat:LR``, ``llrd:LR,DECAY``, ``kenneweg[:BASE]``, a JSON file, or
        ``search`` (an optuna search, :func:`search_distribution`, whose best
        distribution is written to ``OUT/lr_search/best_distribution.json``). Default:
        ``flat`` at ``settings.finetune.lr``.
    out : folder for ``report.json``, ``report.md``, plots, stage results and checkpoints.
        Running again with the same arguments resumes; other arguments are refused
        unless ``overwrite``.
    stabilizer : ``ensemble``, ``swa`` or ``deni`` (:mod:`stepstone.finetune.stabilize`) for both
        target stages (with and without the intermediate step); default none.
    task_options, source_options : the target's and the source's own data options
        (``text_column``, ``label_column``, ``test_file``, ...); an ESM's recorded source
        data is reloaded as recorded, ``source_options`` overriding.
    allow_leakage : run even when the source holds texts of the target (exact or
        normalised matches, :mod:`stepstone.esm.leakage`); by default that is refused
        with :class:`LeakageError`, since the gain would be inflated.
    """
    t0 = time.perf_counter()
    settings = settings or TransferSettings()
    out = Path(out)
    _check_out(out)  # before ranking: a bad --out must not cost a ranking first
    reg = registry if isinstance(registry, Registry) else open_registry(registry)
    if encoder is None or isinstance(encoder, str):
        from stepstone.selection.ranking import registry_encoder

        encoder = registry_encoder(reg, encoder)
    target_task = load_task(target, **(task_options or {})) if isinstance(target, str) \
        else target
    if isinstance(lr_distributions, str):
        lr_distributions = [lr_distributions]
    specs = list(lr_distributions or [f"flat:{settings.finetune.lr:g}"])
    groups = layer_groups(TaskModel(encoder, 2))
    for spec in specs:  # fail before any training on a bad spec
        if spec != SEARCH_SPEC:
            resolve_distribution(spec, groups)
    if len(set(map(_slug, specs))) != len(specs):
        raise ConfigError(f"LR distributions must be distinct; got {specs}.")

    choice = choose_source(target_task, source, reg, encoder=encoder, method=method,
                           progress=progress, source_options=source_options, force=force)
    if choice.task.data_hash() == target_task.data_hash():
        raise DataError(f"The source {choice.task.task_id!r} and the target are the same task "
                        f"(the same data, hash {target_task.data_hash()}); choose another "
                        "source.")
    shared = overlap(target_task, choice.task)
    if shared:
        what = (f"The source {choice.task.task_id!r} ({choice.task.origin or 'in memory'}) "
                f"holds texts of the target {target_task.task_id!r}: {shared}")
        if not allow_leakage:
            raise LeakageError(
                f"{what}: the source model would have seen target texts, so the measured "
                "gain would be inflated. Choose another source (see the leakage warnings of "
                "`stepstone rank`), remove the shared texts, or run anyway with "
                "--allow-leakage (allow_leakage=True).")
        logger.warning("%s; running anyway (allow_leakage): the gain is inflated.", what)
    target_split, source_split = target_task.split_note, choice.task.split_note
    target_task = target_task.subsample(max_train=settings.target_max_examples,
                                        max_test=settings.max_eval, seed=settings.data_seed)
    choice.task = choice.task.subsample(max_train=settings.source_max_examples,
                                        max_test=settings.max_eval, seed=settings.data_seed)
    config = {"target": target_task.task_id, "target_data": target_task.data_hash(),
              "source": choice.task.task_id, "source_data": choice.task.data_hash(),
              "source_model": str(choice.model_dir) if choice.model_dir else None,
              "encoder": encoder.identity.cache_key(), "distributions": specs,
              "settings": {**settings.to_dict(), "seeds": None, "first_seed": None,
                           "keep_checkpoints": None},
              "search": dataclasses.asdict(search) if search and SEARCH_SPEC in specs else None}
    if stabilizer is not None and stabilizer.kind != "none":
        config["stabilizer"] = stabilizer.to_dict()
    _check_run_config(out, config, overwrite=overwrite)

    run = TransferRun(out, target=target_task, source=choice, encoder=encoder,
                      settings=settings, distributions=specs, stabilizer=stabilizer,
                      progress=progress)
    timings: dict[str, float] = {"setup": time.perf_counter() - t0}
    if SEARCH_SPEC in specs:
        t1 = time.perf_counter()
        best = search_distribution(run, search or LRSearchSettings(), out / "lr_search")
        specs[specs.index(SEARCH_SPEC)] = str(best)
        run.specs = specs
        timings["search"] = time.perf_counter() - t1
    distributions = {spec: resolve_distribution(spec, groups) for spec in specs}

    rows = []
    bar = tqdm(total=len(settings.seed_list) * (1 + 2 * len(specs)), desc="transfer",
               unit="stage", disable=not progress)
    for seed in settings.seed_list:
        stages = [run.stage_file(seed, f"{_slug(s)}-{n}") for s in specs
                  for n in ("transfer", "baseline")]
        if all(p.is_file() for p in stages) and run.stage_file(seed, "source").is_file():
            src_model, src_record = None, read_json(run.stage_file(seed, "source"))
        else:  # only load (or train) the source model when a stage still needs it
            src_model, src_record = run.source_model(seed)
        bar.update(1)
        for spec in specs:
            tr = run.target_stage(seed, spec, src_model.encoder if src_model else encoder,
                                  "transfer", src_model.head if src_model else None)
            bar.update(1)
            base = run.target_stage(seed, spec, encoder, "baseline", None)
            bar.update(1)
            rows.append(run.combine(seed, spec, src_record, tr, base))
        if not settings.keep_checkpoints:
            shutil.rmtree(run.checkpoint(seed, "source-model"), ignore_errors=True)
    bar.close()
    _check_finite(rows, settings, len(run.source.task.test), len(target_task.test))
    probe_base = read_json(out / "runs" / "probe_base.json")
    if probe_base is None:
        probe_base = linear_probe(encoder, run.probe_train, choice.task.test,
                                  label_kind=choice.task.label_kind)
        write_json(out / "runs" / "probe_base.json", probe_base)
    timings["total"] = time.perf_counter() - t0
    report = TransferReport(
        target={"task_id": target_task.task_id, "origin": target_task.origin,
                "num_train": len(target_task.train), "num_test": len(target_task.test),
                "num_labels": target_task.num_labels, "label_kind": target_task.label_kind,
                "split": target_split, "classes": list(target_task.classes)},
        source={**choice.to_dict(), "split": source_split,
                "label_kind": choice.task.label_kind, "classes": list(choice.task.classes),
                "leakage": shared.to_dict()},
        settings={"encoder": encoder.name, "encoder_identity": dataclasses.asdict(
            encoder.identity), "registry": str(reg.path), "method": method,
            "transfer": settings.to_dict(),
            "search": dataclasses.asdict(search) if search else None,
            "stabilizer": run.stabilizer.to_dict() if run.stabilizer else None},
        distributions=distributions, runs=rows, primary_metric=run.metric,
        probe_base=float(probe_base), timings={k: round(v, 2) for k, v in timings.items()})
    report.save(out, plots=plots)
    return report


# -- LR distribution search -------------------------------------------------------------
def search_distribution(run: TransferRun, search: LRSearchSettings, folder: Path) -> Path:
    """Search per-group learning rates with optuna (TPE sampler, Hyperband pruner).

    After Kenneweg et al. 2024, who searched per-layer-group LRs by Bayesian
    optimisation with Hyperband. Each trial fine-tunes the (first seed's) source
    model on the target's training split minus a held-out validation share and
    scores ``val metric + retention_weight * source retention ratio`` after every
    epoch (Hyperband prunes on it). Trials live in ``folder/study.sqlite``, so a killed
    search resumes; the best distribution is written to
    ``folder/best_distribution.json`` (a reusable ``--lr-distribution`` file).
    """
    import optuna
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    best_path = folder / "best_distribution.json"
    seed = run.settings.seed_list[0]
    src_model, src_record = run.source_model(seed)
    train, val = _validation_split(run.target, search.validation_ratio, search.seed)
    src_task = run.source.task
    src_eval = _sample(src_task.test, search.source_eval_examples, search.seed)
    before = evaluate(src_model, src_task, src_eval)[run.source_metric]
    groups = layer_groups(src_model)
    ft = run._ft(seed)

    storage = f"sqlite:///{(folder / 'study.sqlite').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="lr-search", storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=search.seed, multivariate=True),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=ft.epochs,
                                              reduction_factor=3))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(stale._trial_id, TrialState.FAIL)  # killed run

    def objective(trial: optuna.Trial) -> float:
        lrs = {g: trial.suggest_float(f"lr:{g}", search.lr_min,
                                      search.lr_max * (10 if g == "head" else 1), log=True)
               for g in groups.names}
        model = _fresh_model(src_model.encoder, run.target.num_labels, ft)

        def score(epoch: int, m: TaskModel) -> dict[str, float]:
            target_val = evaluate(m, run.target, val)[run.metric]
            after = evaluate(_with_head(m.encoder, src_model.head), src_task,
                             src_eval)[run.source_metric]
            value = target_val + search.retention_weight * (after / before if before else 0.0)
            trial.report(value, epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned()
            return {"objective": value, "target_val": target_val, "source_after": after}

        result = finetune(model, train, label_kind=run.target.label_kind, settings=ft,
                          progress=False, lr_distribution=lrs, on_epoch_end=score)
        last = result.epoch_metrics[-1]
        trial.set_user_attr("target_val", last["target_val"])
        trial.set_user_attr("source_after", last["source_after"])
        return last["objective"]

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = search.trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        bar = tqdm(total=search.trials, initial=search.trials - remaining, desc="LR search",
                   unit="trial", disable=not run.progress)
        study.optimize(objective, n_trials=remaining, timeout=search.timeout,
                       callbacks=[lambda s, t: bar.update(1)], catch=(torch.OutOfMemoryError,))
        bar.close()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise DataError(f"The LR search finished no trial (all pruned or failed); see "
                        f"{folder / 'study.sqlite'}. Raise --search-trials or --search-timeout.")
    best = study.best_trial
    mapping = {g: best.params[f"lr:{g}"] for g in groups.names}
    write_json(best_path, mapping)
    write_json(folder / "trials.json", [
        {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
         "user_attrs": t.user_attrs} for t in study.get_trials(deepcopy=False)])
    logger.info("LR search: best of %d trials %.4f -> %s", len(complete), best.value, best_path)
    return best_path
