"""eNTK transferability scores over the transfer matrix's sources (issue 7).

For every target T of the ground-truth matrix and every other task S, the score
``rank --method kernel`` gives S for T: S's kept seed-0 source model (from the
matrix runner's ``registry-s0``) gets a fresh seeded head, the eNTK of
``--shots`` examples per class of T's capped training split is solved, and the
score is the accuracy on ``--eval-examples`` other examples of that split (never
T's test split). ``benchmarks/selection_quality.py`` turns these rows into the
``kernel (eNTK)`` row of the quality table: the order of the sources by score,
the measured seconds per source and the kept model's bytes.

Every pair is appended at once to ``results/kernel_transfer.jsonl`` (one
``write`` per row, fsynced; rows carry the matrix protocol key and a key of the
kernel settings), so a rerun skips what is done. Sources whose model the matrix
run has not fitted yet are skipped; ``--follow`` polls until every pair is done,
so this can run beside ``transfer_matrix.py run``.

    python benchmarks/kernel_transfer.py [--shots 16] [--eval-examples 100] [--follow]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_FILE = HERE / "results" / "kernel_transfer.jsonl"
MATRIX_FILE = HERE / "results" / "transfer_matrix.jsonl"

logger = logging.getLogger("kernel_transfer")


def _matrix_module():
    """benchmarks/transfer_matrix.py (a script beside this one, not a package)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import transfer_matrix

    return transfer_matrix


def settings_key(protocol_key: str, settings: dict[str, Any]) -> str:
    payload = json.dumps({"protocol_key": protocol_key, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Complete rows of a kernel results file (torn lines skipped, as for the matrix)."""
    return [r for r in _matrix_module().read_rows(path) if "kernel_key" in r]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_pass(*, matrix: str | Path = MATRIX_FILE, results: str | Path = RESULTS_FILE,
             work: str | Path | None = None, protocol_key: str | None = None,
             shots: int = 16, eval_examples: int = 100, seed: int = 0,
             kernel: str = "sgd", params: str = "biases", solver: str = "regression",
             targets: list[str] | None = None, progress: bool = True) -> dict[str, int]:
    """Score every (target, source) pair not yet in ``results`` whose source model
    exists; returns counts of pairs done, run now, and still waiting for a model."""
    from tqdm.auto import tqdm

    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.registry import Registry
    from stepstone.esm.specs import load_task
    from stepstone.selection.ranking import prepare_target
    from stepstone.selection.scorers import KernelScorer

    tm = _matrix_module()
    matrix_rows = tm.read_rows(matrix)
    keys = sorted({r["protocol_key"] for r in matrix_rows})
    if protocol_key is None:
        if len(keys) != 1:
            raise ValueError(f"{matrix} holds protocols {keys}; pick one with --protocol.")
        protocol_key = keys[0]
    rows = [r for r in matrix_rows if r["protocol_key"] == protocol_key]
    if not rows:
        raise ValueError(f"No matrix rows with protocol {protocol_key!r}; the file has {keys}.")
    proto = rows[0]["protocol"]
    specs = {r["target"]: r["target_spec"] for r in rows}
    tasks = sorted(specs) if targets is None else list(targets)
    unknown = sorted(set(tasks) - set(specs))
    if unknown:
        raise ValueError(f"Targets {unknown} are not in the matrix; it has {sorted(specs)}.")
    scorer = KernelScorer(shots=shots, eval_examples=eval_examples, seed=seed, kernel=kernel,
                          params=params, solver=solver)
    settings = scorer.settings()
    kkey = settings_key(protocol_key, settings)
    done = {(r["target"], r["source"]) for r in read_pairs(results) if r["kernel_key"] == kkey}
    work = Path(work) if work is not None else tm.WORK_DIR
    reg_dir = tm.registry_dir(work, protocol_key, 0)
    if not reg_dir.is_dir():
        raise FileNotFoundError(f"No {reg_dir}: the kernel scores need the matrix runner's "
                                "seed-0 source models (run transfer_matrix.py --seeds 0 first).")
    encoder = tm.protocol_encoder(proto)
    counts = {"done": len(done), "run": 0, "waiting": 0}
    cache = EmbeddingCache(work / "cache")
    with Registry(reg_dir) as reg:
        have = {}
        for t in specs:
            try:
                have[t] = tm.source_entry(reg, t, encoder)
            except RuntimeError:
                pass  # not fitted yet (or a sharded run elsewhere)
        todo = [(t, s) for t in tasks for s in sorted(specs) if s != t and (t, s) not in done]
        counts["waiting"] = sum(s not in have for _, s in todo)
        todo = [(t, s) for t, s in todo if s in have]
        bar = tqdm(total=len(todo), desc="eNTK pairs", unit="pair", disable=not progress)
        prepared: dict[str, Any] = {}
        for t, s in todo:
            if t not in prepared:
                task = load_task(specs[t]).subsample(
                    max_train=proto["target_max_train"], max_test=proto["target_max_test"],
                    seed=proto["data_seed"])  # the matrix's (and the table's) target sample
                prepared[t] = prepare_target(task, encoder, max_examples=None, cache=cache)
            entry = have[s]
            t0 = time.perf_counter()
            scores = scorer.score(prepared[t], reg, [entry])
            seconds = time.perf_counter() - t0
            if entry.id in scores.errors:
                raise RuntimeError(f"Kernel score of {s} for {t} failed: "
                                   f"{scores.errors[entry.id]}")
            row = {"kernel_key": kkey, "protocol_key": protocol_key, "settings": settings,
                   "target": t, "source": s, "esm_id": entry.id,
                   "score": float(scores.values[entry.id]), "seconds": round(seconds, 3),
                   "model_bytes": _folder_bytes(reg.model_dir(entry.id)),
                   "torch_threads": _torch_threads(), "loadavg_1m": os.getloadavg()[0],
                   "host": platform.node()}
            tm.append_line(Path(results), json.dumps(row, sort_keys=True))
            counts["run"] += 1
            counts["done"] += 1
            bar.update(1)
        bar.close()
    cache.close()
    return counts


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def method_entry(pairs: list[dict[str, Any]], sources: dict[str, list[str]], *,
                 kernel_key: str | None = None) -> dict[str, Any] | None:
    """The ``kernel (eNTK)`` method in ``selection_quality``'s score-cache format.

    ``sources``: target -> the sources the matrix has for it; only targets with a
    score for every one of them enter. Order: score descending, ties by task id
    (as ``rank()`` breaks them). None when no target is complete.
    """
    keys = sorted({p["kernel_key"] for p in pairs})
    if kernel_key is None:
        if len(keys) > 1:
            raise ValueError(f"Kernel rows with several settings {keys}; pick one.")
        if not keys:
            return None
        kernel_key = keys[0]
    pairs = [p for p in pairs if p["kernel_key"] == kernel_key]
    per_target = {}
    for t, srcs in sources.items():
        got = {p["source"]: p for p in pairs if p["target"] == t}
        if not srcs or set(srcs) - set(got):
            continue
        order = sorted(srcs, key=lambda s, got=got: (-got[s]["score"], s))
        secs = sorted(got[s]["seconds"] for s in srcs)
        per_target[t] = {"orders": [order], "candidates": len(srcs),
                         "ms_per_source": 1000 * secs[len(secs) // 2],
                         "bytes_per_source": sum(got[s]["model_bytes"] for s in srcs)
                         / len(srcs)}
    if not per_target:
        return None
    st = pairs[0]["settings"]
    note = (f"eNTK ({st['kernel']}, {st['params']}, {st['solver']}) accuracy of each kept "
            f"source model on {st['shots']} shots/class, scored on {st['eval_examples']} "
            f"held-out target training examples (Malladi et al. 2023); "
            f"{len(per_target)} of {len(sources)} targets")
    spec = {"name": "kernel (eNTK)", "method": "kernel", "registry": "s0", "layer": None,
            "approx_rank": None, "random_seeds": 0, "note": note}
    return {"spec": spec, "per_target": per_target}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default=str(MATRIX_FILE))
    parser.add_argument("--results", default=str(RESULTS_FILE))
    parser.add_argument("--work", default=None, help="The matrix runner's work folder.")
    parser.add_argument("--protocol", default=None, help="Matrix protocol key, if several.")
    parser.add_argument("--targets", nargs="+", default=None)
    parser.add_argument("--shots", type=int, default=16, help="Examples per class.")
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", default="sgd", choices=["sgd", "signgd", "asym"])
    parser.add_argument("--params", default="biases")
    parser.add_argument("--solver", default="regression",
                        choices=["regression", "logistic", "svm"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--follow", action="store_true",
                        help="Poll every --poll seconds until no pair waits for a model.")
    parser.add_argument("--poll", type=float, default=120.0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    while True:
        counts = run_pass(matrix=args.matrix, results=args.results, work=args.work,
                          protocol_key=args.protocol, shots=args.shots,
                          eval_examples=args.eval_examples, seed=args.seed,
                          kernel=args.kernel, params=args.params, solver=args.solver,
                          targets=args.targets, progress=not args.quiet)
        logger.info("pairs: %s", counts)
        if not args.follow or counts["waiting"] == 0:
            break
        time.sleep(args.poll)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
