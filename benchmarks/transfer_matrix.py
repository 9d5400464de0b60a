"""Ground-truth transfer matrix: fine-tune on every source S, then on every target T.

The evidence behind "stepstone chooses well" (issue 5), with the protocol of
Schulte, Hamborg, Akbik (EMNLP 2024, arXiv 2410.15148) scaled to a 2-core CPU:

* for every seed, every source S is fine-tuned once from the base encoder
  (``build_registry`` into ``WORK/<protocol key>/registry-s<seed>`` with
  ``keep_models=True``; the same build also fits the source's linear ESM at full
  depth and at ``exit_layer``, which the selection-quality table scores);
* every cell (S, T != S): S's kept model gets a fresh, seeded head and is
  fine-tuned on T's capped training split, then evaluated on T's capped test
  split (accuracy, macro-F1);
* every baseline (None, T): the base encoder fine-tuned on T alone, same settings.

Protocol (defaults; every row records all of it and a short protocol key):
sources capped at 1,000 training examples (stratified; the sample is drawn with
the training seed, as ``build_registry`` does), targets at 200 training / 500
test examples (stratified, data seed 0, the same sample for every seed and
source), AdamW lr 2e-5, weight decay 0.01, 3 epochs, batch 32, linear decay, no
warm-up, gradient clipping 1.0, dropout 0.1 before the head, seeds 0 and 1
(the seed drives the source sample, both fine-tunings' batch order and dropout,
and both heads' initialisation). Early-exit ESMs at layer 3 of 6.

Every finished cell is appended at once to ``--results`` (JSON lines, one
``write`` per row, flushed and fsynced); a rerun skips cells already there with
the same protocol key, and a torn last line left by a kill is ignored with a
warning and redone. ``--shard I/N`` splits the work between machines: the unit
is a (seed, source) group, so each source model is fine-tuned on one machine
only; with ``--shard`` every machine must use the same ``--tasks`` and
``--seeds``. One process per seed (``--seeds 0`` / ``--seeds 1``) is the other
split; processes may append to the same results file.

Cost (measured 2026-11-23 with one torch thread, as CPU seconds because the
machine ran ~10x more threads than its 2 cores; details in benchmarks/README.md):
a training step of all-MiniLM-L6-v2 at batch 32 costs 1.18 s (movie_polarity,
28 tokens) to 3.84 s (bbc_news, 128 tokens), evaluation 0.020-0.035 s per
example, so one target cell (21 steps + up to 500 test examples) costs 32-99 s,
~51 s on average. 13 tasks give 13 x 12 cells + 13 baselines = 169 cells per
seed: ~2.4 h per seed, ~4.8 h for 2 seeds, plus ~1 h per seed for the 13 source
fine-tunings (the shipped registry's build took 53 min). Two one-thread
processes, one per seed, on an otherwise idle 2-core machine: ~3.5-4 h.

    python benchmarks/transfer_matrix.py run [--tasks all] [--seeds 0 1] [--shard 0/1]
    python benchmarks/transfer_matrix.py status
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stepstone.esm.atomic import append_line, atomic_path

HERE = Path(__file__).resolve().parent
RESULTS_FILE = HERE / "results" / "transfer_matrix.jsonl"
WORK_DIR = HERE / "work" / "matrix"
ROW_FORMAT = 1

logger = logging.getLogger("transfer_matrix")


@dataclass
class Protocol:
    """What a ground-truth cell depends on (besides the seed, source and target)."""

    source_max_examples: int | None = field(
        default=1000, metadata={"help": "Cap on source training examples (stratified)."})
    source_max_eval: int = field(
        default=1000, metadata={"help": "Cap on source test examples (source metric only)."})
    target_max_train: int = field(
        default=200, metadata={"help": "Cap on target training examples (stratified)."})
    target_max_test: int = field(
        default=500, metadata={"help": "Cap on target test examples (stratified)."})
    data_seed: int = field(
        default=0, metadata={"help": "Seed of the target caps (same data for every seed)."})
    lr: float = field(default=2e-5, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    epochs: int = field(default=3, metadata={"help": "Epochs of each fine-tuning."})
    batch_size: int = field(default=32, metadata={"help": "Examples per step."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of steps to warm up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout before the head."})
    exit_layer: int | None = field(
        default=3, metadata={"help": "Also fit early-exit ESMs at this layer (0: none)."})
    # Fields added for protocol v2. None means "as v1", and a None field is left out of
    # the recorded protocol, so v1's key (and its committed rows) stay valid.
    target_lr: float | None = field(
        default=None, metadata={"help": "Peak LR of the target fine-tuning (default: lr)."})
    target_epochs: int | None = field(
        default=None, metadata={"help": "Epochs of the target fine-tuning (default: epochs)."})
    target_warmup_ratio: float | None = field(
        default=None, metadata={"help": "Target warm-up share (default: warmup_ratio)."})
    esm_fit: str | None = field(
        default=None, metadata={"help": "ESM fit of the source builds: ridge or adamw "
                                        "(default: adamw, v1's)."})
    esm_variants: str | None = field(
        default=None, metadata={"help": "Comma-separated extra ESM fits made from the same "
                                        "source model, e.g. adamw (the paper's fit)."})

    def __post_init__(self) -> None:
        if self.source_max_examples is not None and self.source_max_examples < 2:
            raise ValueError(f"'source_max_examples' must be >= 2 or None; got "
                             f"{self.source_max_examples}.")
        for name in ("source_max_eval", "target_max_train", "target_max_test"):
            if getattr(self, name) < 2:
                raise ValueError(f"'{name}' must be >= 2; got {getattr(self, name)}.")
        if self.exit_layer is not None and self.exit_layer < 0:
            raise ValueError(f"'exit_layer' must be >= 0 or None; got {self.exit_layer}.")
        if self.exit_layer == 0:
            self.exit_layer = None
        self.finetune_settings(0)  # validates lr, epochs, batch size, ratios

    def finetune_settings(self, seed: int, *, target: bool = False):
        """The source fine-tuning's settings, or with ``target`` the target's."""
        from stepstone.finetune.train import FinetuneSettings

        def pick(name: str):
            value = getattr(self, f"target_{name}") if target else None
            return getattr(self, name) if value is None else value

        return FinetuneSettings(lr=pick("lr"), weight_decay=self.weight_decay,
                                epochs=pick("epochs"), batch_size=self.batch_size,
                                warmup_ratio=pick("warmup_ratio"),
                                max_grad_norm=self.max_grad_norm, dropout=self.dropout,
                                seed=seed)

    def esm_fit_settings(self, method: str | None = None):
        from stepstone.esm.model import ESMFitSettings

        return ESMFitSettings(method=method or self.esm_fit or "adamw")

    @property
    def variants(self) -> list[str]:
        return [v.strip() for v in (self.esm_variants or "").split(",") if v.strip()]

    def build_settings(self, seed: int, num_layers: int):
        """The registry build of the sources for ``seed`` (kept models, ESMs)."""
        from stepstone.finetune.build import BuildSettings

        exits = (self.exit_layer,) if self.exit_layer and self.exit_layer < num_layers else ()
        return BuildSettings(max_examples=self.source_max_examples,
                             max_eval=self.source_max_eval,
                             finetune=self.finetune_settings(seed), keep_models=True,
                             exit_layers=exits, esm_fit=self.esm_fit_settings(),
                             require_fit=self.esm_fit is not None)  # v1 built without it

    def record(self, encoder) -> dict[str, Any]:
        """The protocol as stored in every row: these fields plus the encoder identity
        (fields added for v2 only where set)."""
        ident = encoder.identity
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if v is not None or k not in V2_FIELDS}
        return {**fields, "encoder": encoder.name,
                "encoder_fingerprint": ident.fingerprint, "pooling": ident.pooling,
                "max_length": ident.max_length}

    @staticmethod
    def key_of(record: dict[str, Any]) -> str:
        """Short key of a recorded protocol (the encoder's name does not count, its
        weights fingerprint does)."""
        payload = {k: v for k, v in record.items() if k != "encoder"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


V2_FIELDS = ("target_lr", "target_epochs", "target_warmup_ratio", "esm_fit", "esm_variants")

# Protocol v2 (issue 14): targets in a regime where fine-tuning learns, sources trained
# 4x v1's steps, closed-form ESMs with the paper's fit beside them. Sources: up to
# 4,000 examples x 3 epochs = 375 steps at batch 32 (v1: 1,000 x 3 = 94). Targets: 256
# training examples x 4 epochs = 32 steps with a 10% warm-up at 1e-4 (v1: 200 x 3 =
# 21 steps at 2e-5, where several baselines never left the majority class), 400 test.
PROTOCOLS: dict[str, Protocol] = {
    "v1": Protocol(),
    "v2": Protocol(source_max_examples=4000, target_max_train=256, target_max_test=400,
                   target_lr=1e-4, target_epochs=4, target_warmup_ratio=0.1,
                   esm_fit="ridge", esm_variants="adamw"),
}


# -- tasks and cells ------------------------------------------------------------------
def resolve_tasks(spec: str | Iterable[str], *, minimum: int = 2) -> list[str]:
    """Task specs from ``all`` / ``builtin:all`` / ids / ``builtin:id`` / file paths
    (comma-separated or a list), in order, without duplicates
    (:func:`stepstone.esm.specs.expand_specs`); at least ``minimum`` of them."""
    from stepstone.esm.specs import expand_specs

    out = expand_specs(spec)
    if len(out) < minimum:
        raise ValueError(f"A transfer matrix needs at least {minimum} tasks; got {out}.")
    return out


def load_tasks(specs: list[str]) -> dict[str, Any]:
    """Task id -> full Task (files: columns ``text`` and ``label``)."""
    from stepstone.esm.specs import load_task

    tasks = {}
    for spec in specs:
        task = load_task(spec)
        if task.task_id in tasks:
            raise ValueError(f"Two task specs give the task id {task.task_id!r}.")
        tasks[task.task_id] = task
    return tasks


def groups(task_ids: list[str], seeds: list[int]) -> list[tuple[int, str | None]]:
    """Work units in a fixed order: (seed, source) with source None for the baselines."""
    return [(seed, src) for seed in seeds for src in [None, *task_ids]]


def shard_groups(all_groups: list, shard: tuple[int, int]) -> list:
    i, n = shard
    return [g for j, g in enumerate(all_groups) if j % n == i]


def cells_of(group: tuple[int, str | None], task_ids: list[str],
             targets: Iterable[str] | None = None) -> list[tuple]:
    """The cells of a group: every target but the source (only ``targets`` if given)."""
    seed, src = group
    keep = set(task_ids if targets is None else targets)
    return [(seed, src, t) for t in task_ids if t != src and t in keep]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N; got {text!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N; got {text!r}.")
    return i, n


# -- the results file -------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a results file; a torn or unreadable line is skipped with a
    warning (a kill mid-write leaves at most the last line torn)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is torn or not JSON (a killed run?); ignored, its "
                               "cell will be run again.", path, n)
                continue
            if not isinstance(row, dict) or "protocol_key" not in row:
                logger.warning("%s line %d is not a transfer-matrix row; ignored.", path, n)
                continue
            rows.append(row)
    return rows


def cell_key(row: dict[str, Any]) -> tuple:
    return (row["seed"], row["source"], row["target"])


def done_cells(rows: list[dict[str, Any]], protocol_key: str) -> set[tuple]:
    return {cell_key(r) for r in rows if r["protocol_key"] == protocol_key}


def _end_with_newline(path: Path) -> None:
    """After a torn last line, start the next row on a line of its own."""
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            append_line(path, "")


# -- running ----------------------------------------------------------------------------
def registry_dir(work: Path, protocol_key: str, seed: int) -> Path:
    return Path(work) / protocol_key / f"registry-s{seed}"


def same_build(reg, src: str, out: Path, seed: int, protocol: Protocol) -> list[str]:
    """ESM ids of ``src`` whose build in ``reg`` differs from the copy exported when the
    source was first built (:func:`export_source_esms`; ids without a copy are not
    compared). The ids come from the build settings, so a rebuild elsewhere (another
    machine's copy of the work folder lost, a GPU, another torch) has the same ids; a
    CPU rebuild of the same seed reproduces the weights, a GPU one does not."""
    import numpy as np

    from stepstone.esm.model import EmbeddingSpaceMap

    primary = protocol.esm_fit or "adamw"
    # seed 0's primary fit is exported in float32, the rest in float16
    tol = 1e-5 if seed == 0 else 2e-3
    differ = []
    for e in reg.entries():
        copy = out / f"s{seed}" / primary / e.id
        if e.task_id != src or not copy.exists():
            continue
        here = EmbeddingSpaceMap.load(reg.esm_dir(e.id)).affine()
        there = EmbeddingSpaceMap.load(copy).affine()
        if here is None or there is None:
            continue
        scale = max(float(np.abs(there[0]).max()), 1e-12)
        if any(not np.allclose(x, y, rtol=0.0, atol=tol * scale)
               for x, y in zip(here, there, strict=True)):
            differ.append(e.id)
    return differ


def _other_build(reg, src: str, out: Path, seed: int, protocol: Protocol) -> bool:
    """Whether ``reg`` holds another build of ``src`` than the one its exported ESMs
    (and so its finished cells) came from; warns if so."""
    differ = same_build(reg, src, out, seed, protocol)
    if differ:
        # Mixing two builds would make one row of the matrix from two source models.
        logger.warning("Source %s (seed %d): this build's ESMs %s differ from those exported "
                       "when its finished cells ran (another machine or device built it); "
                       "leaving its other cells to a run with that build.", src, seed, differ)
    return bool(differ)


def _has_source(folder: Path, task_id: str, encoder, exit_layers: tuple[int, ...]) -> bool:
    """Whether the registry ``folder`` holds ``task_id``'s full-depth ESM with its kept
    model and an ESM for each exit layer (read-only; False when there is none)."""
    from stepstone.esm.registry import DB_NAME, Registry

    if not (folder / DB_NAME).exists():
        return False
    with Registry(folder) as reg:  # one base encoder per registry (an exit layer's
        mine = [e for e in reg.entries() if e.task_id == task_id]  # has its own fingerprint)
    return (any(e.layer is None and e.has_model and e.encoder_identity.matches(encoder.identity)
                for e in mine)
            and {int(k) for k in exit_layers} <= {e.layer for e in mine})


def built_source(work: Path, key: str, seed: int, task, base, protocol: Protocol, *,
                 cache=None, progress: bool = False):
    """The seed's source registry (``registry_dir``), open read-only, once it holds
    ``task`` built with the protocol's settings.

    A missing source is fine-tuned into a staging registry of its own
    (``<work>/<key>/staging-s<seed>/<task>``) and its entries are then added to the
    shared registry, whose write lock is held for that copy only. So shard processes
    fine-tune their sources at the same time; building into the shared registry
    directly held its lock for the whole build (the library's rule, so that two builds
    of one source never both fine-tune), and the other shard waited it out. Resumable:
    the staging build resumes like any build, the copy skips entries already added, and
    the staging folder goes once the shared registry has them all.
    """
    import shutil
    import tempfile

    from stepstone.esm.registry import Registry
    from stepstone.finetune.build import build_registry

    shared = registry_dir(work, key, seed)
    settings = protocol.build_settings(seed, base.num_layers)
    staging = Path(work) / key / f"staging-s{seed}" / task.task_id
    if not _has_source(shared, task.task_id, base, settings.exit_layers):
        with Registry(staging, "w", create=True) as st:
            report = build_registry(st, [task], encoder=base, cache=cache, progress=progress,
                                    settings=settings)
            if report.failed:
                raise RuntimeError(f"Building source {task.task_id!r} (seed {seed}) failed: "
                                   f"{report.failed}")
            with Registry(shared, "w", create=True) as reg, \
                    tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
                for e in st.entries():
                    if reg.find(e.settings_key) is not None:
                        continue
                    model = None
                    if e.has_model:  # a copy: the staging build stays whole until the end
                        model = Path(tmp) / e.id
                        shutil.copytree(st.model_dir(e.id), model)
                    reg.add(st.load_esm(e.id), esm_id=e.id, settings_key=e.settings_key,
                            task_vector=e.task_vector, profile=st.profile(e.id),
                            model_dir=model)
    if staging.exists():
        shutil.rmtree(staging)
    return Registry(shared)


def source_entry(reg, task_id: str, encoder):
    """The full-depth entry with a kept model for ``task_id`` (exactly one expected)."""
    found = [e for e in reg.entries() if e.task_id == task_id and e.has_model
             and e.encoder_identity.matches(encoder.identity)]
    if len(found) != 1:
        raise RuntimeError(f"Expected one kept source model for {task_id!r} in {reg.path}; "
                           f"found {[e.id for e in found]}.")
    return found[0]


def protocol_encoder(record: dict[str, Any]):
    """The base encoder a recorded protocol names, checked against its fingerprint."""
    from stepstone.esm.encoder import load_encoder

    encoder = load_encoder(record["encoder"], pooling=record["pooling"],
                           max_length=record["max_length"])
    if encoder.identity.fingerprint != record["encoder_fingerprint"]:
        raise ValueError(f"Encoder {record['encoder']!r} has fingerprint "
                         f"{encoder.identity.fingerprint}; the matrix was made with "
                         f"{record['encoder_fingerprint']}.")
    return encoder


def esm_export_dir(results: Path, protocol_key: str) -> Path:
    """Where a protocol's source ESMs are kept for good (committed beside the rows)."""
    return Path(results).parent / f"matrix_esms_{protocol_key}"


def export_source_esms(reg, src: str, task, base, protocol: Protocol, seed: int, *,
                       out: Path, cache=None, progress: bool = False) -> list[Path]:
    """Copy every ESM the build made for ``src`` (full depth and early exit) to
    ``out/s<seed>/<fit>/<esm id>/`` and fit each of ``protocol.variants`` (e.g. the
    paper's adamw fit) on the same (base, tuned) pairs beside it.

    The source models are too large to commit and a later session may not have them;
    the ESMs are what the selection-quality table needs, so they are written as soon as
    the source is built. Seed 0's primary fit keeps float32 (the shipped registry is
    rebuilt from it); the other copies are stored as float16 (their scores move far
    less than the differences between sources: see benchmarks/README.md). Returns the
    folders written; a folder already there is kept.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from stepstone.esm.model import WEIGHTS_NAME, fit_esm
    from stepstone.finetune.train import load_task_model

    settings = protocol.build_settings(seed, base.num_layers)
    primary = protocol.esm_fit or "adamw"
    entries = [e for e in reg.entries() if e.task_id == src]
    written: list[Path] = []

    def half(folder: Path) -> None:
        if seed == 0 and folder.parent.name == primary:
            return
        state = load_file(str(folder / WEIGHTS_NAME))
        save_file({k: v.half() for k, v in state.items()}, str(folder / WEIGHTS_NAME),
                  metadata={"format": "pt"})

    todo = []
    for entry in entries:
        dest = out / f"s{seed}" / primary / entry.id
        if not dest.exists():
            with atomic_path(dest) as tmp:
                shutil.copytree(reg.esm_dir(entry.id), tmp)
                half(tmp)
            written.append(dest)
        todo += [(entry, v) for v in protocol.variants
                 if not (out / f"s{seed}" / v / entry.id).exists()]
    if not todo:
        return written
    kept = source_entry(reg, src, base)
    tuned_model = load_task_model(reg.model_dir(kept.id), name=base.name, device=base.device)
    capped = task.subsample(max_train=settings.max_examples, max_test=settings.max_eval,
                            seed=settings.finetune.seed)
    inputs = capped.train.inputs()
    tuned = tuned_model.encoder.embed(inputs, progress=progress)
    for entry, variant in todo:
        layer = entry.layer
        encoder = base if layer in (None, base.num_layers) else base.with_layer(layer)
        X = encoder.embed(inputs, cache=cache, progress=progress)
        config = reg.config(entry.id)
        esm, _ = fit_esm(X, tuned, architecture=config.architecture, rank=config.rank,
                         hidden_dim=config.hidden_dim,
                         settings=protocol.esm_fit_settings(variant), config=config)
        esm.config.metrics.update({k: v for k, v in config.metrics.items()
                                   if k.startswith("source_test_")})
        dest = out / f"s{seed}" / variant / entry.id
        with atomic_path(dest) as tmp:
            esm.save(tmp)
            half(tmp)
        written.append(dest)
    return written


def majority_baseline(target) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the target's most frequent training
    class on its test split: the floor a fine-tuned baseline must clearly beat."""
    import numpy as np
    from sklearn.metrics import f1_score

    if target.label_kind != "classification":
        return {}
    values, counts = np.unique(target.train.labels, return_counts=True)
    pred = np.full(len(target.test.labels), values[np.argmax(counts)])
    return {"majority_accuracy": float(np.mean(pred == target.test.labels)),
            "majority_macro_f1": float(f1_score(target.test.labels, pred, average="macro"))}


def run_cell(start, target, *, seed: int, protocol: Protocol) -> dict[str, Any]:
    """Fine-tune a copy of encoder ``start`` with a fresh seeded head on ``target``
    (already capped) and evaluate it on the target's test split."""
    import torch

    from stepstone.finetune.train import TaskModel, evaluate, finetune

    ft = protocol.finetune_settings(seed, target=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the fresh head's init is part of the seed
    model = TaskModel(start.copy(), target.num_labels, dropout=ft.dropout)
    result = finetune(model, target.train, label_kind=target.label_kind, settings=ft,
                      progress=False)
    train_s = time.perf_counter() - t0
    metrics = evaluate(model, target, target.test)
    return {**metrics, **majority_baseline(target), "steps": result.steps,
            "train_seconds": round(train_s, 2), "seconds": round(time.perf_counter() - t0, 2)}


def _cell_job(*, seed: int, src: str | None, tgt: str, start_dir: str | None,
              target_spec: str, target_data: str, encoder: str,
              protocol_fields: dict[str, Any]) -> dict[str, Any]:
    """One cell on an executor worker. Everything is reloaded by name or path (the
    base encoder, S's kept model from the registry folder, T from its spec), so only
    small arguments cross the wire; the driver writes the results file."""
    from stepstone.esm.encoder import load_encoder
    from stepstone.esm.specs import load_task
    from stepstone.finetune.train import load_task_model

    protocol = Protocol(**protocol_fields)
    base = load_encoder(encoder)
    start = base if start_dir is None else load_task_model(start_dir, name=base.name).encoder
    target = load_task(target_spec).subsample(
        max_train=protocol.target_max_train, max_test=protocol.target_max_test,
        seed=protocol.data_seed)
    if target.data_hash() != target_data:
        raise RuntimeError(f"Target {tgt!r} on this worker differs from the driver's "
                           f"(data hash {target.data_hash()[:12]} vs {target_data[:12]}); "
                           f"install the same data packages/files on every node.")
    return run_cell(start, target, seed=seed, protocol=protocol)


def _run_on_executor(executor, todo, *, base, base_name, key, work, protocol, full_tasks,
                     spec_of, data_hash, write, progress, esm_out, started, skipped_sources
                     ) -> tuple[int, dict[str, str]]:
    """Run ``todo`` cells as executor jobs: source models first (a registry build on the
    executor, written by this driver), then every cell as one job; each finished cell
    is written as it returns. A ``started`` source whose build differs from its exported
    one is left out (see :func:`_other_build`) and named in ``skipped_sources``.
    Returns (cells run, errors by cell id)."""
    from stepstone.esm.registry import Registry
    from stepstone.finetune.build import build_registry
    from stepstone.finetune.executor import Job, make_executor

    if executor.executor == "ray":  # the workers need this script's code, not a module
        from ray import cloudpickle

        if __name__ != "__main__":
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start_dirs: dict[tuple[int, str], tuple[str, str]] = {}  # (model dir, ESM id)
    for seed in sorted({c[0] for c in todo}):
        needed = sorted({src for s, src, _ in todo if s == seed and src is not None})
        if not needed:
            continue
        reg_path = registry_dir(work, key, seed)
        report = build_registry(reg_path, [full_tasks[src] for src in needed], encoder=base,
                                settings=protocol.build_settings(seed, base.num_layers),
                                progress=progress, executor=executor)
        if report.failed:
            raise RuntimeError(f"Building sources (seed {seed}) failed: {report.failed}")
        with Registry(reg_path) as reg:
            for src in needed:
                if (seed, src) in started and _other_build(reg, src, esm_out, seed, protocol):
                    skipped_sources.append(f"s{seed}:{src}")
                    continue
                entry = source_entry(reg, src, base)
                start_dirs[(seed, src)] = (str(reg.model_dir(entry.id)), entry.id)
                export_source_esms(reg, src, full_tasks[src], base, protocol, seed,
                                   out=esm_out)
    todo = [c for c in todo if c[1] is None or (c[0], c[1]) in start_dirs]
    jobs = [Job(f"s{seed}:{src or '-'}:{tgt}", {
        "seed": seed, "src": src, "tgt": tgt,
        "start_dir": start_dirs[(seed, src)][0] if src else None,
        "target_spec": spec_of[tgt], "target_data": data_hash[tgt]})
        for seed, src, tgt in todo]
    by_id = {j.id: j for j in jobs}
    ran, errors = 0, {}
    shared = {"encoder": base_name, "protocol_fields": dataclasses.asdict(protocol)}
    with make_executor(executor) as ex:
        for res in ex.map(_cell_job, jobs, shared=shared, catch=(RuntimeError, ValueError),
                          progress=progress, desc="cells", unit="cell"):
            if not res.ok:
                errors[res.id] = res.error
                continue
            kw = by_id[res.id].kwargs
            src = kw["src"]
            write(kw["seed"], src, kw["tgt"], start_dirs[(kw["seed"], src)][1] if src else None,
                  res.value)
            ran += 1
    return ran, errors


def run(
    *,
    tasks: str | list[str] = "all",
    seeds: list[int] = (0, 1),
    shard: tuple[int, int] = (0, 1),
    work: str | Path = WORK_DIR,
    results: str | Path = RESULTS_FILE,
    encoder: str | None = None,
    protocol: Protocol | None = None,
    progress: bool = True,
    executor=None,
    targets: str | list[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every cell of this shard that ``results`` does not hold yet.

    ``executor``: a :class:`stepstone.finetune.executor.ExecutorSettings`; with ``ray`` the
    source fine-tunes and then the cells run as Ray jobs (the registry folders under
    ``work`` must be on storage every node sees), and this process alone writes the
    registries and ``results``. Default: one cell after another in this process.

    ``device``: where the local path fine-tunes and evaluates (``cuda``, ``cuda:1``, ...;
    several shard processes may share one GPU). The device is not part of the
    protocol: rows from any device share its key.

    ``targets``: only these targets (ids; default: every task), e.g. a second seed on a
    subset of the matrix; every task is still a source.

    Returns a summary: protocol key, cells in the shard, cells run now, seconds.
    """
    from tqdm.auto import tqdm

    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.encoder import DEFAULT_ENCODER, load_encoder
    from stepstone.finetune.train import load_task_model

    protocol = protocol or Protocol()
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"'seeds' must be distinct and non-empty; got {seeds}.")
    results, work = Path(results), Path(work)
    specs = resolve_tasks(tasks)
    full_tasks = load_tasks(specs)
    spec_of = dict(zip(full_tasks, specs, strict=True))
    task_ids = list(full_tasks)
    target_ids = None if targets is None else [
        t.split(":", 1)[-1] for t in resolve_tasks(targets, minimum=1)]
    if encoder and Path(encoder).is_dir():
        encoder = str(Path(encoder).resolve())  # rows name it; the table reloads it by name
    base = load_encoder(encoder or DEFAULT_ENCODER, device=device)
    record = protocol.record(base)
    key = Protocol.key_of(record)
    targets = {t: task.subsample(max_train=protocol.target_max_train,
                                 max_test=protocol.target_max_test, seed=protocol.data_seed)
               for t, task in full_tasks.items()}
    data_hash = {t: task.data_hash() for t, task in targets.items()}

    unknown = sorted(set(target_ids or ()) - set(task_ids))
    if unknown:
        raise ValueError(f"--targets {unknown} are not among the tasks {task_ids}.")
    mine = shard_groups(groups(task_ids, seeds), shard)
    if target_ids is not None:  # a group with no cell left (a target's own source) is moot
        mine = [g for g in mine if cells_of(g, task_ids, target_ids)]
    all_cells = [c for g in mine for c in cells_of(g, task_ids, target_ids)]
    esm_out = esm_export_dir(results, key)
    done = done_cells(read_rows(results), key)
    todo = [c for c in all_cells if c not in done]
    # sources with cells done already (maybe elsewhere): continued only with that build
    started = {(seed, src) for seed, src, _ in done if src is not None}
    skipped_sources: list[str] = []
    logger.info("Protocol %s, shard %d/%d: %d cells, %d done, %d to run.", key, *shard,
                len(all_cells), len(all_cells) - len(todo), len(todo))
    _end_with_newline(results)
    t_start = time.perf_counter()

    def write(seed: int, src: str | None, tgt: str, source_id: str | None,
              metrics: dict[str, Any]) -> None:
        row = {
            "format": ROW_FORMAT, "protocol_key": key, "protocol": record,
            "seed": seed, "source": src, "target": tgt,
            "source_spec": spec_of[src] if src else None, "target_spec": spec_of[tgt],
            "source_esm_id": source_id, "target_data": data_hash[tgt],
            "n_train": len(targets[tgt].train), "n_test": len(targets[tgt].test),
            **metrics,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
        }
        append_line(results, json.dumps(row, sort_keys=True))

    if executor is not None and executor.executor != "local":
        ran, errors = _run_on_executor(
            executor, todo, base=base, base_name=encoder or DEFAULT_ENCODER, key=key,
            work=work, protocol=protocol, full_tasks=full_tasks, spec_of=spec_of,
            data_hash=data_hash, write=write, progress=progress, esm_out=esm_out,
            started=started, skipped_sources=skipped_sources)
        return {"protocol_key": key, "shard": f"{shard[0]}/{shard[1]}",
                "cells": len(all_cells), "already_done": len(all_cells) - len(todo),
                "ran": ran, "failed": errors, "skipped_sources": skipped_sources,
                "seconds": round(time.perf_counter() - t_start, 1), "results": str(results)}
    cache = EmbeddingCache(work / "cache")
    ran = 0
    bar = tqdm(total=len(all_cells), initial=len(all_cells) - len(todo), desc="cells",
               unit="cell", disable=not progress)
    try:
        for seed, src in mine:
            cells = [c for c in cells_of((seed, src), task_ids, target_ids) if c not in done]
            if not cells:
                continue
            source_id = None
            if src is None:
                start = base
            else:
                reg = built_source(work, key, seed, full_tasks[src], base, protocol,
                                   cache=cache, progress=progress)
                entry = source_entry(reg, src, base)
                source_id = entry.id
                if (seed, src) in started and _other_build(reg, src, esm_out, seed, protocol):
                    skipped_sources.append(f"s{seed}:{src}")
                    reg.close()
                    continue
                export_source_esms(reg, src, full_tasks[src], base, protocol, seed,
                                   out=esm_out, cache=cache)
                start = load_task_model(reg.model_dir(entry.id), name=base.name,
                                        device=base.device).encoder
                reg.close()
            for _, _, tgt in cells:
                bar.set_postfix_str(f"s{seed} {src or '(none)'} -> {tgt}")
                metrics = run_cell(start, targets[tgt], seed=seed, protocol=protocol)
                write(seed, src, tgt, source_id, metrics)
                ran += 1
                bar.update(1)
    finally:
        bar.close()
        cache.close()
    return {"protocol_key": key, "shard": f"{shard[0]}/{shard[1]}", "cells": len(all_cells),
            "already_done": len(all_cells) - len(todo), "ran": ran,
            "skipped_sources": skipped_sources,
            "seconds": round(time.perf_counter() - t_start, 1), "results": str(results)}


def status(*, tasks: str | list[str] = "all", seeds: list[int] = (0, 1),
           results: str | Path = RESULTS_FILE) -> dict[str, Any]:
    """Rows per protocol key and, per key, how many of the expected cells are done."""
    rows = read_rows(results)
    task_ids = [t.split(":", 1)[1] if t.startswith("builtin:") else Path(t).stem
                for t in resolve_tasks(tasks)]
    expected = [c for g in groups(task_ids, list(seeds)) for c in cells_of(g, task_ids)]
    out = {}
    for key in sorted({r["protocol_key"] for r in rows}):
        done = done_cells(rows, key)
        out[key] = {"rows": sum(r["protocol_key"] == key for r in rows),
                    "expected_done": sum(c in done for c in expected),
                    "expected": len(expected),
                    "baselines": baseline_check([r for r in rows if r["protocol_key"] == key])}
    return out


def ship(*, out: str | Path, protocol_key: str, tasks: str | list[str] = "all",
         work: str | Path = WORK_DIR, seed: int = 0) -> dict[str, Any]:
    """Write the full-depth ESMs of ``tasks`` from the seed's source build into a fresh
    registry ``out`` (no kept models), replacing it atomically: the registry the quality
    table scores, which ``make registry`` (the same build settings from the CLI) then
    reproduces key for key without fine-tuning anything.

    Refuses when a task has no full-depth ESM in the build (the run is not done)."""
    from stepstone.esm.atomic import atomic_path
    from stepstone.esm.registry import Registry

    task_ids = [t.split(":", 1)[1] if t.startswith("builtin:") else Path(t).stem
                for t in resolve_tasks(tasks)]
    with Registry(registry_dir(Path(work), protocol_key, seed)) as src:
        entries = {e.task_id: e for e in src.entries() if e.layer is None}
        missing = [t for t in task_ids if t not in entries]
        if missing:
            raise ValueError(f"The seed-{seed} build of protocol {protocol_key} has no "
                             f"full-depth ESM for {missing}; finish the run first.")
        with atomic_path(Path(out)) as tmp:
            with Registry(tmp, "w", create=True) as reg:
                for t in task_ids:
                    e = entries[t]
                    reg.add(src.load_esm(e.id), esm_id=e.id, settings_key=e.settings_key,
                            task_vector=e.task_vector, profile=src.profile(e.id))
    return {"registry": str(out), "protocol_key": protocol_key, "seed": seed,
            "esms": [entries[t].id for t in task_ids]}


# Pre-registered for protocol v2 (benchmarks/README.md): a target counts in the headline
# numbers only if its no-intermediate baseline clears the majority-class floor by this
# much on every seed (macro-F1; regression: Pearson r at least this high, doubled).
LEARNS_MARGIN = 0.10


def baseline_check(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: each seed's baseline macro-F1 (Pearson r for regression) and the
    majority-class floor, the smallest margin over seeds, and whether the target passes
    the pre-registered rule (margin >= LEARNS_MARGIN; regression: r >= 2 x margin).
    Rows without the floor (v1) are left out."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted((r for r in rows if r["source"] is None), key=lambda r: r["seed"]):
        if "pearson" in r:
            score, floor, need = r["pearson"], 0.0, 2 * LEARNS_MARGIN
        elif "majority_macro_f1" in r:
            score, floor, need = r["macro_f1"], r["majority_macro_f1"], LEARNS_MARGIN
        else:
            continue
        entry = out.setdefault(r["target"], {"seeds": {}, "floor": round(floor, 4)})
        entry["seeds"][r["seed"]] = round(score, 4)
        margin = min(v for v in entry["seeds"].values()) - floor
        entry["margin"] = round(margin, 4)
        entry["learns"] = bool(margin >= need)
    return out


# -- CLI --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="Run the cells of this shard that are not done yet.")
    p_status = sub.add_parser("status", help="Count finished cells per protocol key.")
    p_ship = sub.add_parser("ship", help="Write the seed's full-depth ESMs into a fresh "
                                         "registry (the shipped one: esm/default_registry).")
    p_ship.add_argument("--out", required=True, help="Registry folder to (re)write.")
    p_ship.add_argument("--tasks", default="all", help="The sources (default: the pool).")
    p_ship.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v2")
    p_ship.add_argument("--seed", type=int, default=0)
    p_ship.add_argument("--work", default=str(WORK_DIR))
    for p in (p_run, p_status):
        p.add_argument("--tasks", default="all",
                       help="Comma-separated built-in ids, builtin:all, or task files.")
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                       help="Training seeds (default: 0 1).")
        p.add_argument("--results", default=None,
                       help="The append-only JSON-lines file of finished cells (default: "
                            "results/transfer_matrix.jsonl for v1, transfer_matrix_v2.jsonl "
                            "for v2).")
        p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v1",
                       help="Protocol preset; the options below override its fields.")
    p_run.add_argument("--shard", type=parse_shard, default=(0, 1),
                       help="I/N: run the I-th of N deterministic parts (0-based).")
    p_run.add_argument("--work", default=str(WORK_DIR),
                       help="Per-seed source registries (kept models) and the embedding cache.")
    p_run.add_argument("--encoder", default=None,
                       help="Encoder package, folder or Hub id (default: all-MiniLM-L6-v2).")
    p_run.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's). On a machine shared with "
                            "other jobs use 1: oversubscribed threads spin and run far slower.")
    p_run.add_argument("--targets", default=None,
                       help="Only these targets (comma-separated ids; default: every task), "
                            "e.g. a second seed on part of the matrix.")
    p_run.add_argument("--device", default="cpu",
                       help="torch device of the local run (e.g. cuda; shards may share one).")
    p_run.add_argument("--quiet", action="store_true", help="No progress bars.")
    from stepstone.cli import add_config_args, config_from_args
    from stepstone.finetune.executor import ExecutorSettings

    add_config_args(p_run, ExecutorSettings)  # --executor local|ray, --ray-address, ...
    add_config_args(p_run, Protocol)  # --source-max-examples, --lr, ... (defaults: Protocol's)
    args = parser.parse_args(argv)
    if getattr(args, "results", "") is None:
        args.results = str(RESULTS_FILE if args.protocol == "v1"
                           else RESULTS_FILE.with_name(f"transfer_matrix_{args.protocol}.jsonl"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "ship":
        from stepstone.esm.encoder import DEFAULT_ENCODER, load_encoder

        key = Protocol.key_of(PROTOCOLS[args.protocol].record(load_encoder(DEFAULT_ENCODER)))
        print(json.dumps(ship(out=args.out, protocol_key=key, tasks=args.tasks,
                              work=args.work, seed=args.seed), indent=2))
        return 0
    if args.command == "status":
        print(json.dumps(status(tasks=args.tasks, seeds=args.seeds, results=args.results),
                         indent=2))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    protocol = config_from_args(Protocol, args, base=PROTOCOLS[args.protocol])
    summary = run(tasks=args.tasks, seeds=args.seeds, shard=args.shard, work=args.work,
                  results=args.results, encoder=args.encoder, protocol=protocol,
                  progress=not args.quiet, targets=args.targets, device=args.device,
                  executor=config_from_args(ExecutorSettings, args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
