"""Registry builds: fine-tune the base encoder on each source and store its ESM.

For every source task: cap its training split, fine-tune a copy of the base
encoder with a fresh head (paper defaults: AdamW 2e-5, wd 0.01, 3 epochs, batch
32, linear decay), embed the source texts with the base and the tuned encoder,
fit the ESM on the pairs and add it to the registry atomically. A source already
built with the same settings is skipped, so a killed build resumes on rerun.

The per-source work (:func:`fit_source`) writes nothing; it returns
:class:`SourceArtifacts` that the driver adds (:func:`add_source`). So the jobs can
run here or on a Ray cluster (:mod:`stepstone.finetune.executor`) while the registry keeps
one writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepstone.esm.cache import EmbeddingCache
from stepstone.esm.data import DataError, Task, token_counts
from stepstone.esm.encoder import Encoder, EncoderMismatchError, load_encoder
from stepstone.esm.errors import ConfigError
from stepstone.esm.leakage import KEYS_NAME, task_texts, text_keys
from stepstone.esm.model import (
    ARCHITECTURES,
    EmbeddingSpaceMap,
    ESMConfig,
    ESMFitSettings,
    check_fit,
    fit_esm,
)
from stepstone.esm.registry import Registry, RegistryEntry, esm_id_for
from stepstone.esm.specs import expand_specs, load_task
from stepstone.finetune.executor import ExecutorSettings, Job, job_device, make_executor
from stepstone.finetune.train import (
    FinetuneSettings,
    TaskModel,
    evaluate,
    finetune,
    save_task_model,
)

logger = logging.getLogger(__name__)



@dataclass
class BuildSettings:
    """How each source is turned into an ESM."""

    max_examples: int | None = field(
        default=1000, metadata={"help": "Cap on source training examples (stratified)."})
    max_eval: int = field(
        default=1000, metadata={"help": "Cap on source test examples used to score the model."})
    architecture: str = field(default="linear", metadata={"help": "ESM architecture."})
    rank: int | None = field(default=None, metadata={"help": "Rank of a low-rank ESM."})
    hidden_dim: int | None = field(default=None, metadata={"help": "Hidden size of an MLP ESM."})
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    esm_fit: ESMFitSettings = field(default_factory=ESMFitSettings)
    keep_models: bool = field(
        default=False, metadata={"help": "Also store the fine-tuned source encoder + head."})
    exit_layers: tuple[int, ...] = field(
        default=(), metadata={"help": "Also fit ESMs from these early-exit layers' embeddings."})
    require_fit: bool = field(
        default=True, metadata={"help": "Fail a source whose ESM predicts the tuned embeddings "
                                        "worse than the identity map (held-out pairs)."})

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"'architecture' must be one of {list(ARCHITECTURES)}; "
                              f"got {self.architecture!r}.")
        self.exit_layers = tuple(int(k) for k in self.exit_layers)
        if any(k < 1 for k in self.exit_layers):
            raise ConfigError(f"'exit_layers' must be positive; got {self.exit_layers}.")
        if self.max_examples is not None and self.max_examples < 2:
            raise ConfigError(f"'max_examples' must be >= 2 or None; got {self.max_examples}.")

    def key_dict(self) -> dict[str, Any]:
        """The settings that change the ESM (``keep_models`` does not)."""
        d = dataclasses.asdict(self)
        d.pop("keep_models")
        d.pop("exit_layers")  # each layer's ESM is keyed by its own encoder identity
        d.pop("require_fit")  # decides whether an ESM is kept, not what it is
        d["esm_fit"] = self.esm_fit.key_dict()
        return d


@dataclass
class BuildReport:
    """Outcome of a build: ids added and skipped, failures by source, wall time, and each
    loaded source's label kind with the rule that decided it (``labels``)."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    per_source_seconds: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)  # source -> its test split, and how

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"added {len(self.added)}, skipped {len(self.skipped)} (already built), "
                 f"failed {len(self.failed)} in {self.seconds:.0f}s"]
        lines += [f"  labels of {src}: {kind}" for src, kind in self.labels.items()]
        lines += [f"  test split of {src}: {note}" for src, note in self.splits.items()]
        lines += [f"  failed {src}: {msg}" for src, msg in self.failed.items()]
        return "\n".join(lines)


def settings_key(encoder: Encoder, task: Task, settings: BuildSettings) -> str:
    payload = json.dumps({"encoder": encoder.identity.cache_key(), "task": task.task_id,
                          "data": task.data_hash(), "settings": settings.key_dict()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@dataclass
class FittedESM:
    """One ESM fitted on a worker, ready for :meth:`Registry.add` on the driver.

    ``model_files``: the kept fine-tuned source model (relative path → bytes), so
    it travels between machines; None unless ``keep_models``.
    """

    esm_id: str
    settings_key: str
    esm: EmbeddingSpaceMap
    task_vector: np.ndarray
    profile: dict[str, Any]
    model_files: dict[str, bytes] | None = None


@dataclass
class SourceArtifacts:
    """Everything one source's job made: its ESMs (empty when all were built before), and
    the source's label kind with its rule (:meth:`Task.label_summary`)."""

    task_id: str
    esms: list[FittedESM] = field(default_factory=list)
    seconds: float = 0.0
    labels: str = ""
    split: str = ""


def fit_source(
    encoder: Encoder,
    task: Task,
    *,
    settings: BuildSettings,
    skip: Container[str] = (),
    cache: EmbeddingCache | None = None,
    progress: bool = True,
) -> SourceArtifacts:
    """Fine-tune on one source and fit its ESM(s); writes nothing to any registry.

    One ESM maps the full encoder's embeddings; with ``settings.exit_layers`` one
    more per layer maps that early-exit layer's embeddings (Kang et al. 2021) to
    the same fine-tuned space. ESMs whose settings key is in ``skip`` are not
    fitted; when all are, nothing is fine-tuned. Add the result to a registry with
    :func:`add_source` (the registry's one writer, the driver, does that).
    """
    start = time.perf_counter()
    base_encoders = [encoder] + [encoder.with_layer(k) for k in settings.exit_layers
                                 if k != encoder.num_layers]
    keys = [settings_key(e, task, settings) for e in base_encoders]
    todo = [(e, k) for e, k in zip(base_encoders, keys, strict=True) if k not in skip]
    logger.info("Source %s: labels %s.", task.task_id, task.label_summary())
    if not todo:
        return SourceArtifacts(task.task_id, labels=task.label_summary(),
                               split=task.split_note)
    capped = task.subsample(max_train=settings.max_examples, max_test=settings.max_eval,
                            seed=settings.finetune.seed)
    tuned_encoder = encoder.copy()
    # Seed the head init too, so a source builds the same in any process (a Ray
    # worker, a resumed build) whatever the global RNG went through before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.finetune.seed)
        model = TaskModel(tuned_encoder, task.num_labels, dropout=settings.finetune.dropout)
    model.head.to(encoder.device)
    result = finetune(model, capped.train, label_kind=task.label_kind,
                      settings=settings.finetune, progress=progress,
                      desc=f"fine-tuning {task.task_id}")
    source_metrics = evaluate(model, capped, capped.test)
    inputs = capped.train.inputs()
    tuned = tuned_encoder.embed(inputs, progress=progress)
    texts = [t if isinstance(t, str) else f"{t[0]} {t[1]}" for t in inputs]
    finetune_record = {
        **settings.finetune.to_dict(), "max_examples": settings.max_examples,
        "steps": result.steps, "seconds": round(result.seconds, 1)}
    metrics = {f"source_test_{k}": v for k, v in source_metrics.items()}
    profile = {"num_train": len(capped.train), "token_counts": token_counts(texts),
               KEYS_NAME: text_keys(task_texts(task))}
    out = SourceArtifacts(task.task_id, labels=task.label_summary(),
                          split=task.split_note)
    for base_encoder, key in todo:
        base = base_encoder.embed(inputs, cache=cache, progress=progress)
        config = ESMConfig(
            encoder=dataclasses.asdict(base_encoder.identity), task_id=task.task_id,
            task_data_hash=task.data_hash(), task_origin=task.origin, task_spec=task.spec,
            num_examples=len(capped.train), label_kind=task.label_kind,
            classes=list(task.classes), finetune=finetune_record)
        esm, fit = fit_esm(base, tuned, architecture=settings.architecture, rank=settings.rank,
                           hidden_dim=settings.hidden_dim, settings=settings.esm_fit,
                           config=config)
        if settings.require_fit:
            check_fit(fit, what=f"source {task.task_id!r}")
        esm.config.metrics.update(metrics)
        mean = base.astype(np.float64).mean(0)
        task_vector = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
        model_files = None
        if settings.keep_models and base_encoder is encoder:
            with tempfile.TemporaryDirectory() as tmp:
                save_task_model(model, tmp, label_kind=task.label_kind,
                                classes=task.classes)
                model_files = _read_files(Path(tmp))
        out.esms.append(FittedESM(esm_id_for(task.task_id, key), key, esm.cpu(), task_vector,
                                  profile, model_files))
    out.seconds = time.perf_counter() - start
    return out


def add_source(registry: Registry, artifacts: SourceArtifacts) -> list[RegistryEntry]:
    """Add a source's fitted ESMs to ``registry`` atomically; returns the entries added.

    An ESM whose settings key the registry already holds (built meanwhile, or the
    same source listed twice) is left out.
    """
    added = []
    for fitted in artifacts.esms:
        if registry.find(fitted.settings_key) is not None:
            continue
        # Outside the registry: its .staging holds only what pending rows name.
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = None
            if fitted.model_files is not None:
                model_dir = Path(tmp) / "model"
                _write_files(model_dir, fitted.model_files)
            added.append(registry.add(
                fitted.esm, esm_id=fitted.esm_id, settings_key=fitted.settings_key,
                task_vector=fitted.task_vector, profile=fitted.profile, model_dir=model_dir))
    return added


def build_source(
    registry: Registry,
    encoder: Encoder,
    task: Task,
    *,
    settings: BuildSettings,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
) -> list[RegistryEntry]:
    """Fine-tune on one source and add its ESM(s); returns the entries added.

    :func:`fit_source` then :func:`add_source`; ESMs already present are skipped,
    and when all are, nothing is fine-tuned.
    """
    artifacts = fit_source(encoder, task, settings=settings, skip=_RegistryKeys(registry),
                           cache=cache, progress=progress)
    return add_source(registry, artifacts)


class _RegistryKeys:
    """``key in registry_keys``: a live lookup, so the local build sees its own additions."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.registry.find(key) is not None


@dataclass(frozen=True)
class EncoderSpec:
    """How a worker loads the driver's encoder itself, and the fingerprint it must get."""

    name: str
    source: str
    pooling: str
    max_length: int
    layer: int | None
    fingerprint: str

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderSpec:
        # A folder is passed on as an absolute path (workers need not share our working
        # directory); a package or Hub name resolves on each worker's own install.
        source = str(Path(encoder.name).resolve()) if Path(encoder.name).is_dir() \
            else encoder.name
        return cls(encoder.name, source, encoder.pooling, encoder.max_length, encoder.layer,
                   encoder.fingerprint)

    def load(self, device: str = "cpu") -> Encoder:
        """Load by name; raise :class:`EncoderMismatchError` if the weights differ."""
        encoder = load_encoder(self.source, pooling=self.pooling,
                               max_length=self.max_length, layer=self.layer, device=device)
        encoder.name = self.name  # the name ESM configs record, as on the driver
        if encoder.fingerprint != self.fingerprint:
            raise EncoderMismatchError(
                f"Encoder {self.name!r} loads on this worker with weights fingerprint "
                f"{encoder.fingerprint}; the driver's has {self.fingerprint}. Ray workers "
                "load the encoder by name, so it must be the same installed package or "
                "folder on every node (an encoder changed in memory: save it to a folder "
                "and pass that path).")
        return encoder


_WORKER_ENCODER: dict[tuple[EncoderSpec, str], Encoder] = {}


def _worker_encoder(spec: EncoderSpec, device: str) -> Encoder:
    # A Ray worker process runs many jobs; load the base encoder once (jobs deep-copy
    # it before fine-tuning, so it stays the base).
    key = (spec, device)
    if key not in _WORKER_ENCODER:
        _WORKER_ENCODER.clear()
        _WORKER_ENCODER[key] = spec.load(device)
    return _WORKER_ENCODER[key]


def encoder_fingerprint(spec: EncoderSpec) -> str:
    """A worker job: the fingerprint of the encoder as it loads there (a preflight check)."""
    return spec.load("cpu").fingerprint


def source_job(
    *,
    item: str | Task,
    encoder: Encoder | EncoderSpec,
    settings: BuildSettings,
    skip: Container[str],
    cache: EmbeddingCache | str | None,
    task_options: dict[str, Any],
    progress: bool,
) -> SourceArtifacts:
    """One registry-build job: load the source, then :func:`fit_source` (no writes).

    Runs in the driver (local executor: ``encoder`` an :class:`Encoder`, ``cache``
    an open cache) or on a Ray worker (``encoder`` an :class:`EncoderSpec` loaded
    there, ``cache`` a folder each worker opens itself).
    """
    task = load_task(item, **task_options) if isinstance(item, str) else item
    if isinstance(encoder, EncoderSpec):
        encoder = _worker_encoder(encoder, job_device())
    if isinstance(cache, str):
        cache = EmbeddingCache(cache)
    return fit_source(encoder, task, settings=settings, skip=skip, cache=cache,
                      progress=progress)


def build_registry(
    registry: str | Path | Registry,
    sources: str | Sequence[str | Task],
    *,
    encoder: Encoder,
    settings: BuildSettings | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
    executor: ExecutorSettings | None = None,
) -> BuildReport:
    """Build ESMs for ``sources`` into ``registry`` (created if missing).

    A source that fails (bad data, diverged training) is reported by name in
    ``BuildReport.failed`` and the others still build.

    ``executor``: where the per-source jobs run (default: here, one after another;
    ``ExecutorSettings(executor="ray", ...)``: on a Ray cluster, see
    :mod:`stepstone.finetune.executor`). Either way only this process writes the registry,
    each source as soon as its job returns, so a killed build resumes on rerun.
    On Ray a source whose worker died ``1 + max_retries`` times is reported in
    ``failed``; workers load the encoder by name and must get the same weights.
    """
    settings = settings or BuildSettings()
    executor = executor or ExecutorSettings()
    reg = registry if isinstance(registry, Registry) else Registry(registry, "w", create=True)
    report = BuildReport()
    start = time.perf_counter()
    items = expand_specs(sources)
    if not items:
        raise DataError(f"No sources to build from {sources!r}.")
    names: dict[str, str] = {}
    jobs = []
    for item in items:
        name = item.task_id if isinstance(item, Task) else item
        job_id = name if name not in names else f"{name}#{len(names)}"
        names[job_id] = name
        jobs.append(Job(job_id, {"item": item}))
    remote = executor.executor != "local"
    shared: dict[str, Any] = {
        "encoder": EncoderSpec.of(encoder) if remote else encoder,
        "settings": settings,
        "skip": _RegistryKeys(reg),  # remote: a snapshot, taken under the lock below
        "cache": (str(cache.directory) if cache is not None else None) if remote else cache,
        "task_options": dict(task_options or {}),
        "progress": progress and not remote,
    }
    # The write lock for the whole build: a second build waits here, then its live
    # skip check (_RegistryKeys) finds what this one added before fine-tuning anything.
    with reg.write_lock(), make_executor(executor) as ex:
        if remote:
            shared["skip"] = frozenset(e.settings_key for e in reg.entries())
            _check_worker_encoder(ex, shared["encoder"])
        for result in ex.map(source_job, jobs, shared=shared, catch=_REPORTED,
                             progress=progress, desc="sources", unit="source"):
            name = names[result.id]
            if not result.ok:
                report.failed[name] = result.error
                continue
            report.labels[name] = result.value.labels
            if result.value.split:
                report.splits[name] = result.value.split
            t0 = time.perf_counter()
            try:
                entries = add_source(reg, result.value)
            except _REPORTED as err:
                logger.error("Source %s failed: %s", name, err)
                report.failed[name] = f"{type(err).__name__}: {err}"
                continue
            if not entries:
                report.skipped.append(name)
            for entry in entries:
                report.added.append(entry.id)
                report.per_source_seconds[entry.id] = round(
                    result.seconds + time.perf_counter() - t0, 1)
    report.seconds = time.perf_counter() - start
    return report


# Errors that fail one source (reported by name); anything else stops the build.
_REPORTED: tuple[type[BaseException], ...] = (DataError, ValueError, RuntimeError)


def _check_worker_encoder(ex: Any, spec: EncoderSpec) -> None:
    """Fail the whole build up front when a worker loads other weights than the driver."""
    (result,) = ex.map(encoder_fingerprint, [Job("encoder-check", {"spec": spec})],
                       progress=False)
    if not result.ok:
        raise RuntimeError(f"Could not load encoder {spec.name!r} on a Ray worker: "
                           f"{result.error}")
    if result.value != spec.fingerprint:
        raise EncoderMismatchError(
            f"Encoder {spec.name!r} loads on the Ray workers with weights fingerprint "
            f"{result.value}; the driver's has {spec.fingerprint}. Workers load the encoder "
            "by name, so it must be the same installed package or folder on every node (an "
            "encoder changed in memory: save it to a folder and pass that path).")
