"""Seed spread and cost of the fine-tuning stabilisers: none / ensemble / swa / deni.

For each built-in target, a fixed small training subset and a fixed test subset;
for each seed, the default encoder (all-MiniLM-L6-v2) with a fresh head is
fine-tuned with each stabiliser (:func:`stepstone.finetune.stabilize.train_stabilized`) and
the combined prediction is scored on the test subset. Reported per target and
stabiliser: mean and std over seeds of accuracy and macro-F1, the std relative to
``none``, and the cost as model-steps (optimizer steps over all models trained) and
training wall time relative to ``none`` (median over seeds of the per-seed ratio;
runs of one seed are taken side by side).

Resumable: every finished (target, kind, seed) run is appended at once to
``results/stabilizers_runs.jsonl``; a rerun with the same settings skips it. The
summary (``results/stabilizers.json``, ``results/stabilizers.png``) covers the
``--seeds`` given.

    python benchmarks/bench_stabilizers.py [--seeds 0 1 2 3 4] [--members 4] [--interval 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from stepstone.esm.catalog import load_builtin
from stepstone.esm.encoder import load_encoder
from stepstone.finetune.stabilize import StabilizerSettings, train_stabilized
from stepstone.finetune.train import FinetuneSettings, TaskModel

RESULTS = Path(__file__).parent / "results"
KINDS = ("none", "ensemble", "swa", "deni")


def subsets(task_id: str, n_train: int, n_test: int, seed: int = 0):
    """A fixed training/test subset (the same for every seed and stabiliser).

    Frozen on purpose: results/stabilizers_runs.jsonl was drawn with this permutation
    stream; the library's uniform sampler (``stepstone.esm.sampling.uniform_indices``)
    draws other rows for the same seed and would change every committed number."""
    task = load_builtin(task_id)
    rng = np.random.default_rng(seed)
    train = task.train.take(np.sort(rng.permutation(len(task.train))[:n_train]))
    test = task.test.take(np.sort(rng.permutation(len(task.test))[:n_test]))
    return task, train, test


def run_one(encoder, task, train, test, kind: str, seed: int, args) -> dict:
    torch.manual_seed(seed)  # the head's initialisation
    model = TaskModel(encoder.copy(), len(task.classes), dropout=0.1)
    settings = FinetuneSettings(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                warmup_ratio=0.1, seed=seed)
    stab = StabilizerSettings(kind=kind, members=args.members,
                              interpolation_interval=args.interval)
    result = train_stabilized(model, train, label_kind=task.label_kind, settings=settings,
                              stabilizer=stab, progress=not args.quiet,
                              desc=f"{task.task_id} {kind} seed {seed}")
    t0 = time.perf_counter()
    metrics = result.evaluate(task, test)
    return {"target": task.task_id, "kind": kind, "seed": seed, **metrics,
            "model_steps": result.model_steps, "steps": result.steps,
            "members": len(result.members), "train_seconds": result.seconds,
            "eval_seconds": time.perf_counter() - t0, "warnings": result.warnings,
            "schedule": result.schedule.to_dict() if result.schedule is not None else None}


def summarise(rows: list[dict], targets: list[str]) -> dict:
    out = {}
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        base = {r["seed"]: r for r in mine if r["kind"] == "none"}
        per_kind = {}
        for kind in KINDS:
            rs = sorted((r for r in mine if r["kind"] == kind), key=lambda r: r["seed"])
            if not rs:
                continue
            acc = [r["accuracy"] for r in rs]
            f1 = [r["macro_f1"] for r in rs]
            wall = [r["train_seconds"] / base[r["seed"]]["train_seconds"] for r in rs
                    if r["seed"] in base]
            steps = [r["model_steps"] / base[r["seed"]]["model_steps"] for r in rs
                     if r["seed"] in base]
            per_kind[kind] = {
                "seeds": [r["seed"] for r in rs], "accuracy": acc, "macro_f1": f1,
                "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc, ddof=1))
                if len(acc) > 1 else None,
                "macro_f1_mean": float(np.mean(f1)), "macro_f1_std": float(np.std(f1, ddof=1))
                if len(f1) > 1 else None,
                "model_steps": rs[0]["model_steps"],
                "model_steps_vs_none": statistics.median(steps) if steps else None,
                "wall_vs_none_median": statistics.median(wall) if wall else None,
                "train_seconds_median": statistics.median(r["train_seconds"] for r in rs)}
        none = per_kind.get("none")
        for v in per_kind.values():
            for m in ("accuracy", "macro_f1"):
                ok = none and none[f"{m}_std"] and v[f"{m}_std"] is not None
                v[f"{m}_std_vs_none"] = v[f"{m}_std"] / none[f"{m}_std"] if ok else None
        out[target] = per_kind
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(summary)
    fig, axes = plt.subplots(2, len(targets), figsize=(4.5 * len(targets), 6.5), squeeze=False)
    for j, target in enumerate(targets):
        for i, metric in enumerate(("accuracy", "macro_f1")):
            ax = axes[i][j]
            kinds = list(summary[target])
            for x, kind in enumerate(kinds):
                vals = summary[target][kind][metric]
                jitter = np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else [0.0]
                ax.scatter(x + np.asarray(jitter), vals, s=14, alpha=0.7)
                ax.errorbar(x + 0.3, np.mean(vals), yerr=np.std(vals, ddof=1)
                            if len(vals) > 1 else 0, fmt="o", color="black", capsize=3)
            ax.set_xticks(range(len(kinds)), kinds)
            ax.set_title(f"{target}: {metric} per seed")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["tweet_sentiment", "trec6"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--train", type=int, default=64, help="Training examples.")
    parser.add_argument("--test", type=int, default=200, help="Test examples.")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--members", type=int, default=4, help="M (ensemble and DENI).")
    parser.add_argument("--interval", type=int, default=2,
                        help="DENI interpolation interval (library default 125).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    parser.add_argument("--runs", default=str(RESULTS / "stabilizers_runs.jsonl"))
    parser.add_argument("--out", default=str(RESULTS / "stabilizers.json"))
    parser.add_argument("--plot", default=str(RESULTS / "stabilizers.png"))
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = {k: getattr(args, k) for k in ("train", "test", "epochs", "batch_size", "lr",
                                            "members", "interval")}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    runs = Path(args.runs)
    runs.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in runs.read_text().splitlines()] if runs.exists() else []
    rows = [r for r in rows if r.get("config") == key]
    done = {(r["target"], r["kind"], r["seed"]) for r in rows}

    encoder = load_encoder()
    data = {t: subsets(t, args.train, args.test) for t in args.targets}
    for seed in args.seeds:  # seed-major, so a stopped run leaves whole seeds
        for target in args.targets:
            task, train, test = data[target]
            for kind in args.kinds:
                if (target, kind, seed) in done:
                    continue
                row = {**run_one(encoder, task, train, test, kind, seed, args),
                       "config": key, "settings": config}
                rows.append(row)
                with runs.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{target:>16} {kind:>8} seed {seed}: acc {row['accuracy']:.4f} "
                      f"F1 {row['macro_f1']:.4f} model-steps {row['model_steps']} "
                      f"train {row['train_seconds']:.1f}s", flush=True)

    summary = summarise([r for r in rows if r["seed"] in args.seeds], args.targets)
    out = {"config": config, "config_key": key, "encoder": encoder.name,
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads,
                       "torch": torch.__version__, "platform": platform.platform()},
           "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    plot(summary, Path(args.plot))
    print(f"\n{'target':>16} {'kind':>8} {'acc mean±std':>16} {'F1 mean±std':>16} "
          f"{'std/none':>9} {'steps×':>7} {'wall×':>6}")
    for target, per_kind in summary.items():
        for kind, v in per_kind.items():
            def fmt(m, v=v):
                s = v[f"{m}_std"]
                return f"{v[f'{m}_mean']:.4f}±{s:.4f}" if s is not None else \
                    f"{v[f'{m}_mean']:.4f}"
            ratio = v["accuracy_std_vs_none"]
            print(f"{target:>16} {kind:>8} {fmt('accuracy'):>16} {fmt('macro_f1'):>16} "
                  f"{ratio if ratio is None else round(ratio, 2)!s:>9} "
                  f"{v['model_steps_vs_none'] or 0:>7.2f} {v['wall_vs_none_median'] or 0:>6.2f}")


if __name__ == "__main__":
    main()
