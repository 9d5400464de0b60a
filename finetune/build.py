"""Registry builds: fine-tune the base encoder on each source and store its ESM.

For every source task: cap its training split, fine-tune a copy of the base
encoder with a fresh head (paper defaults: AdamW 2e-5, wd 0.01, 3 epochs, batch
32, linear decay), embed the source texts with the base and the tuned encoder,
fit the ESM on the pairs and add it to the registry atomically. A source already
built with the same settings is skipped, so a killed build resumes on rerun.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from esm.cache import EmbeddingCache
from esm.catalog import builtin_ids, is_available
from esm.data import BUILTIN_PREFIX, DataError, Task, load_task, token_counts
from esm.encoder import Encoder
from esm.model import ARCHITECTURES, ESMConfig, ESMFitSettings, fit_esm
from esm.registry import STAGING_DIR, Registry, RegistryEntry
from finetune.train import FinetuneSettings, TaskModel, evaluate, finetune

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

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"'architecture' must be one of {list(ARCHITECTURES)}; "
                             f"got {self.architecture!r}.")
        self.exit_layers = tuple(int(k) for k in self.exit_layers)
        if any(k < 1 for k in self.exit_layers):
            raise ValueError(f"'exit_layers' must be positive; got {self.exit_layers}.")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"'max_examples' must be >= 2 or None; got {self.max_examples}.")

    def key_dict(self) -> dict[str, Any]:
        """The settings that change the ESM (``keep_models`` does not)."""
        d = dataclasses.asdict(self)
        d.pop("keep_models")
        d.pop("exit_layers")  # each layer's ESM is keyed by its own encoder identity
        return d


@dataclass
class BuildReport:
    """Outcome of a build: ids added and skipped, failures by source, wall time."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    per_source_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"added {len(self.added)}, skipped {len(self.skipped)} (already built), "
                 f"failed {len(self.failed)} in {self.seconds:.0f}s"]
        lines += [f"  failed {src}: {msg}" for src, msg in self.failed.items()]
        return "\n".join(lines)


def expand_sources(sources: str | Sequence[str | Task]) -> list[str | Task]:
    """``builtin:all``, ``builtin:a,b``, ``a,b`` (ids), paths and Task objects → a list."""
    if isinstance(sources, str):
        sources = [sources]
    out: list[str | Task] = []
    for item in sources:
        if isinstance(item, Task):
            out.append(item)
            continue
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            if part in ("builtin:all", "all"):
                missing = [i for i in builtin_ids() if not is_available(i)]
                if missing:
                    logger.warning("Skipping built-in tasks whose package is not installed: %s",
                                   missing)
                out += [BUILTIN_PREFIX + i for i in builtin_ids() if is_available(i)]
            elif part in builtin_ids():
                out.append(BUILTIN_PREFIX + part)
            else:
                out.append(part)
    return out


def settings_key(encoder: Encoder, task: Task, settings: BuildSettings) -> str:
    payload = json.dumps({"encoder": encoder.identity.cache_key(), "task": task.task_id,
                          "data": task.data_hash(), "settings": settings.key_dict()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _save_source_model(model: TaskModel, task: Task, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.model.save_pretrained(folder / "encoder")
    model.encoder.tokenizer.save_pretrained(folder / "encoder")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
              str(folder / "head.safetensors"))
    (folder / "head.json").write_text(json.dumps(
        {"num_labels": model.head.out_features, "label_kind": task.label_kind,
         "classes": list(task.classes), "pooling": model.encoder.pooling,
         "max_length": model.encoder.max_length}, indent=2, sort_keys=True))


def _add_esm(registry, task, capped, base_encoder, base, tuned, *, key, settings, extra,
             model_dir) -> RegistryEntry:
    config = ESMConfig(
        encoder=dataclasses.asdict(base_encoder.identity), task_id=task.task_id,
        task_data_hash=task.data_hash(), task_origin=task.origin,
        num_examples=len(capped.train), label_kind=task.label_kind, classes=list(task.classes),
        finetune=extra["finetune"])
    esm, _ = fit_esm(base, tuned, architecture=settings.architecture, rank=settings.rank,
                     hidden_dim=settings.hidden_dim, settings=settings.esm_fit, config=config)
    esm.config.metrics.update(extra["metrics"])
    mean = base.astype(np.float64).mean(0)
    task_vector = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
    return registry.add(esm, esm_id=f"{task.task_id}-{key[:8]}", settings_key=key,
                        task_vector=task_vector, profile=extra["profile"], model_dir=model_dir)


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

    One ESM maps the full encoder's embeddings; with ``settings.exit_layers`` one
    more per layer maps that early-exit layer's embeddings (Kang et al. 2021) to
    the same fine-tuned space. Entries already present are skipped; when all are,
    nothing is fine-tuned.
    """
    base_encoders = [encoder] + [encoder.with_layer(k) for k in settings.exit_layers
                                 if k != encoder.num_layers]
    keys = [settings_key(e, task, settings) for e in base_encoders]
    todo = [(e, k) for e, k in zip(base_encoders, keys, strict=True)
            if registry.find(k) is None]
    if not todo:
        return []
    capped = task.subsample(max_train=settings.max_examples, max_test=settings.max_eval,
                            seed=settings.finetune.seed)
    tuned_encoder = Encoder(copy.deepcopy(encoder.model), encoder.tokenizer,
                            name=encoder.name, pooling=encoder.pooling,
                            max_length=encoder.max_length)
    model = TaskModel(tuned_encoder, task.num_labels, dropout=settings.finetune.dropout)
    result = finetune(model, capped.train, label_kind=task.label_kind,
                      settings=settings.finetune, progress=progress,
                      desc=f"fine-tuning {task.task_id}")
    source_metrics = evaluate(model, capped, capped.test)
    inputs = capped.train.inputs()
    tuned = tuned_encoder.embed(inputs, progress=progress)
    texts = [t if isinstance(t, str) else f"{t[0]} {t[1]}" for t in inputs]
    extra = {
        "finetune": {**settings.finetune.to_dict(), "max_examples": settings.max_examples,
                     "steps": result.steps, "seconds": round(result.seconds, 1)},
        "metrics": {f"source_test_{k}": v for k, v in source_metrics.items()},
        "profile": {"num_train": len(capped.train), "token_counts": token_counts(texts)},
    }
    added = []
    staging = registry.path / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    for i, (base_encoder, key) in enumerate(todo):
        base = base_encoder.embed(inputs, cache=cache, progress=progress)
        with tempfile.TemporaryDirectory(dir=staging) as tmp:
            model_dir = None
            if settings.keep_models and i == 0 and base_encoder is encoder:
                model_dir = Path(tmp) / "model"
                _save_source_model(model, task, model_dir)
            added.append(_add_esm(registry, task, capped, base_encoder, base, tuned, key=key,
                                  settings=settings, extra=extra, model_dir=model_dir))
    return added


def build_registry(
    registry: str | Path | Registry,
    sources: str | Sequence[str | Task],
    *,
    encoder: Encoder,
    settings: BuildSettings | None = None,
    cache: EmbeddingCache | None = None,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
) -> BuildReport:
    """Build ESMs for ``sources`` into ``registry`` (created if missing).

    A source that fails (bad data, diverged training) is reported by name in
    ``BuildReport.failed`` and the others still build.
    """
    settings = settings or BuildSettings()
    reg = registry if isinstance(registry, Registry) else Registry(registry, create=True)
    report = BuildReport()
    start = time.perf_counter()
    items = expand_sources(sources)
    if not items:
        raise DataError(f"No sources to build from {sources!r}.")
    for item in tqdm(items, desc="sources", unit="source", disable=not progress):
        name = item.task_id if isinstance(item, Task) else item
        t0 = time.perf_counter()
        try:
            task = load_task(item, **(task_options or {})) if isinstance(item, str) else item
            entries = build_source(reg, encoder, task, settings=settings, cache=cache,
                                 progress=progress)
        except (DataError, ValueError, RuntimeError) as err:
            logger.error("Source %s failed: %s", name, err)
            report.failed[name] = f"{type(err).__name__}: {err}"
            continue
        if not entries:
            report.skipped.append(name)
        for entry in entries:
            report.added.append(entry.id)
            report.per_source_seconds[entry.id] = round(time.perf_counter() - t0, 1)
    report.seconds = time.perf_counter() - start
    return report
