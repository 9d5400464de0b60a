"""Fit a gain model from a transfer matrix: score every matrix target against the
registry holding the matrix's source ESMs, join the scores with the measured gains,
and fit (``stepstone gain fit``).

The matrix rows are what ``benchmarks/transfer_matrix.py`` writes (one JSON object per
line: ``protocol_key``, ``protocol``, ``seed``, ``source`` (None = no intermediate
step), ``target``, ``target_spec`` and the metric). Each target is scored on its
protocol sample (``target_max_train`` training examples drawn with ``data_seed``), the
sample its fine-tuning cells were measured on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from stepstone.esm.errors import ConfigError
from stepstone.esm.registry import Registry, default_registry_path, open_registry
from stepstone.esm.specs import load_task
from stepstone.selection.gain import (
    DEFAULT_ALPHA,
    DEFAULT_LEVEL,
    FEATURE_METHOD,
    FEATURES,
    GainModel,
    GainModelError,
    cells_from_scores,
    fit_gain_model,
)
from stepstone.selection.metrics import GroundTruth, load_ground_truth

logger = logging.getLogger(__name__)

SCORES_FORMAT = 1


def read_matrix(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a transfer-matrix JSONL file (torn lines skipped with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--matrix must be a transfer-matrix JSONL file; got {str(path)!r}.")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON; ignored.", path, n)
            continue
        if isinstance(row, dict) and "protocol_key" in row:
            rows.append(row)
    return rows


def restrict_rows(rows: list[dict[str, Any]], tasks: str | list[str]) -> list[dict[str, Any]]:
    """The matrix rows among the task specs ``tasks`` (comma-separated or a list; ``all``
    = the benchmark pool, :func:`stepstone.esm.specs.expand_specs`): those whose target
    and source (if any) are both among them."""
    from stepstone.esm.specs import expand_specs

    specs = {str(s) for s in expand_specs(tasks)}
    kept = [r for r in rows if r.get("target_spec") in specs
            and (r.get("source") is None or r.get("source_spec") in specs)]
    if len(kept) < len(rows):
        logger.info("Kept %d of %d matrix rows: those among the tasks %s.", len(kept),
                    len(rows), tasks)
    return kept


def matrix_fingerprint(path: str | Path) -> str:
    """sha256 of the matrix file's bytes, first 16 hex digits."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def matrix_gains(gt: GroundTruth) -> dict[str, dict[str, float]]:
    """target -> source -> gain in points (100 x mean-over-seeds difference)."""
    return {t: {s: 100.0 * (p - gt.mean_base(t)) for s, p in gt.mean_perf(t).items()}
            for t in gt.targets()}


def complete_targets(gt: GroundTruth) -> list[str]:
    """Targets with a baseline and a cell for every other task of the matrix."""
    return [t for t in gt.targets() if len(gt.mean_perf(t)) == len(gt.tasks) - 1]


def score_targets(gt: GroundTruth, registry: str | Path | Registry | None, *,
                  targets: list[str] | None = None, esm_ids: dict[str, str] | None = None,
                  cache: Any = True, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Per-target feature inputs (see :func:`stepstone.selection.gain.cells_from_scores`)
    for the matrix's targets, scored against ``registry`` on each target's protocol
    sample; sources are keyed by task id (the matrix's names). A registry holding
    several ESMs of one source task uses the one ``esm_ids`` names
    (:func:`matrix_esm_ids`).
    """
    from tqdm.auto import tqdm

    from stepstone.selection.ranking import rank

    reg = registry if isinstance(registry, Registry) else open_registry(registry)
    p = gt.protocol
    wanted = list(targets if targets is not None else gt.targets())
    out: dict[str, dict[str, Any]] = {}
    for t in tqdm(wanted, desc="scoring targets", unit="target", disable=not progress):
        task = load_task(gt.specs[t]).subsample(max_train=p["target_max_train"],
                                                max_test=p["target_max_test"],
                                                seed=p["data_seed"])
        # gain=True only for the TextEmb signal it adds; the shipped model is not used
        r = rank(task, reg, FEATURE_METHOD, max_examples=None, cache=cache,
                 exclude_target=True, progress=False, gain=True, check_leakage=False)
        if r.errors:
            raise GainModelError(f"Sources failed on {t}: {r.errors}")
        by_task: dict[str, list] = {}
        for row in r.rows:
            by_task.setdefault(row.task_id, []).append(row)
        chosen = {}
        for task_id, rows in by_task.items():
            if len(rows) > 1:
                named = [row for row in rows if row.esm_id == (esm_ids or {}).get(task_id)]
                if len(named) != 1:
                    raise GainModelError(
                        f"The registry holds {len(rows)} ESMs of {task_id!r} "
                        f"({[x.esm_id for x in rows]}) and the matrix names "
                        f"{(esm_ids or {}).get(task_id)!r}; use a registry with one ESM per "
                        f"source.")
                rows = named
            chosen[task_id] = rows[0]
        textemb = r.signals.get("textemb", {})
        missing = [row.esm_id for row in chosen.values() if row.esm_id not in textemb]
        if missing:
            raise GainModelError(f"No TextEmb score (task vector) for {missing} on {t}.")
        out[t] = {"reference": r.reference,
                  "esm_logme": {k: row.score for k, row in chosen.items()},
                  "textemb": {k: textemb[row.esm_id] for k, row in chosen.items()},
                  "num_examples": {k: row.num_examples for k, row in chosen.items()},
                  "esm_ids": {k: row.esm_id for k, row in chosen.items()},
                  "encoder": {"name": r.settings["encoder"],
                              "fingerprint": r.settings["encoder_fingerprint"],
                              **{k: r.settings[k] for k in ("pooling", "max_length",
                                                            "layer")}}}
    return out


def matrix_esm_ids(rows: list[dict[str, Any]], protocol_key: str) -> dict[str, str]:
    """source task -> the ESM id its lowest-seed rows name (what a registry built by
    the matrix runner holds for it)."""
    out: dict[str, tuple[int, str]] = {}
    for r in rows:
        if r.get("protocol_key") == protocol_key and r.get("source") and r.get(
                "source_esm_id"):
            if r["source"] not in out or r["seed"] < out[r["source"]][0]:
                out[r["source"]] = (r["seed"], r["source_esm_id"])
    return {k: v for k, (_, v) in out.items()}


def fit_from_matrix(matrix: str | Path, registry: str | Path | Registry | None = None, *,
                    scores: str | Path | None = None, protocol_key: str | None = None,
                    metric: str = "accuracy", alpha: float = DEFAULT_ALPHA,
                    level: float = DEFAULT_LEVEL, tasks: str | list[str] | None = None,
                    cache: Any = True,
                    progress: bool = True) -> tuple[GainModel, dict[str, Any]]:
    """Fit a gain model on ``matrix`` (a transfer-matrix JSONL file) with features
    scored against ``registry`` (the one holding the matrix's source ESMs; default:
    the shipped one). ``scores``: a JSON file of per-target scores; read when it holds
    this matrix's protocol and every target, else computed and written there.

    Only targets with a cell for every source are used (a partial row would make the
    within-target z-scores and the interval's calibration unlike a full ranking).
    ``tasks``: use only the cells among these task specs (:func:`restrict_rows`; ``all``
    = the benchmark pool), e.g. when the file also holds a few cells of other tasks.
    Returns the model and the scores record.
    """
    matrix = Path(matrix)
    rows = read_matrix(matrix)
    if tasks is not None:
        rows = restrict_rows(rows, tasks)
    gt = load_ground_truth(rows, protocol_key=protocol_key, metric=metric)
    targets = complete_targets(gt)
    if len(targets) < 3:
        raise GainModelError(
            f"The matrix {str(matrix)!r} (protocol {gt.protocol_key}) has {len(targets)} "
            f"targets with a cell for every source; a gain model needs >= 3.")
    record = None
    if scores is not None and Path(scores).is_file():
        record = json.loads(Path(scores).read_text())
        if (record.get("format") != SCORES_FORMAT or record.get("protocol_key")
                != gt.protocol_key or set(targets) - set(record.get("targets", {}))):
            logger.info("The scores file %s is for another protocol or lacks targets; "
                        "scoring again.", scores)
            record = None
    if record is None:
        per_target = score_targets(gt, registry, targets=targets, cache=cache,
                                   esm_ids=matrix_esm_ids(rows, gt.protocol_key),
                                   progress=progress)
        reg_path = registry.path if isinstance(registry, Registry) else (
            registry if registry is not None else default_registry_path())
        record = {"format": SCORES_FORMAT, "protocol_key": gt.protocol_key,
                  "method": FEATURE_METHOD, "registry": str(reg_path),
                  "targets": per_target}
        if scores is not None:
            Path(scores).parent.mkdir(parents=True, exist_ok=True)
            Path(scores).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    per_target = {t: record["targets"][t] for t in targets}
    encoders = {json.dumps(rec["encoder"], sort_keys=True) for rec in per_target.values()}
    if len(encoders) != 1:
        raise GainModelError(f"The targets were scored with several encoders: {encoders}.")
    encoder = per_target[targets[0]]["encoder"]
    if gt.protocol.get("encoder_fingerprint") not in (None, encoder.get("fingerprint")):
        raise GainModelError(
            f"The matrix was measured with encoder fingerprint "
            f"{gt.protocol['encoder_fingerprint']!r}; the registry's ESMs are for "
            f"{encoder.get('fingerprint')!r}.")
    gains = matrix_gains(gt)
    lacking = sorted({s for t in targets for s in gains[t]} - {
        s for t in targets for s in per_target[t]["esm_logme"]})
    if lacking:
        raise GainModelError(f"The registry holds no ESM of the matrix's sources {lacking}; "
                             f"pass the registry the matrix was run with (--registry).")
    cells = cells_from_scores(per_target, gains)
    meta = {"matrix_file": matrix.name, "matrix_fingerprint": matrix_fingerprint(matrix),
            "protocol_key": gt.protocol_key, "protocol": gt.protocol, "metric": metric,
            "seeds": gt.seeds, "tasks": list(gt.tasks),
            "target_max_train": gt.protocol.get("target_max_train"),
            "encoder": {k: encoder.get(k) for k in ("name", "fingerprint", "pooling",
                                                    "max_length", "layer")},
            "features_from": FEATURE_METHOD}
    return fit_gain_model(cells, features=FEATURES, alpha=alpha, level=level,
                          meta=meta), record
