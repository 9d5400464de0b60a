"""eNTK-predicted vs actual few-shot fine-tuning accuracy (Malladi et al. 2023).

For each built-in target, shots per class and seed: draw the few-shot sample,
initialise the classifier head under the seed, compute the SGD eNTK of the
default encoder (parameter subsets: biases, and the last layer at the smallest
shot count), solve kernel regression and kernel logistic regression, then
fine-tune a copy of exactly the same model on the same sample with the same
seed (``FewShotFinetuneSettings``) and evaluate both on the same test slice.
Times and peak resident memory (sampled from /proc every 10 ms) are recorded.

Resumable: every finished cell is appended to results/kernel.jsonl at once and
skipped on rerun; results/kernel.json holds the summary. ``--memory`` measures
the peak-RSS rise of one kernel per (subset, shots) in a fresh process each
(results/kernel_memory.json): in the main run the allocator keeps what earlier
cells freed, so its per-cell rises are only upper-bounded by the first cells.

    python benchmarks/bench_kernel.py [--targets ...] [--shots 16 64] [--seeds 0 1]
    python benchmarks/bench_kernel.py --memory
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from stepstone.esm.catalog import load_builtin
from stepstone.esm.encoder import load_encoder
from stepstone.esm.taskmodel import TaskModel, metrics_from_outputs
from stepstone.finetune.kernel import FewShotFinetuneSettings
from stepstone.finetune.train import evaluate, finetune
from stepstone.selection.entk import compute_kernel
from stepstone.selection.entk_formulations import ClassifierFormulation
from stepstone.selection.entk_solvers import KernelSettings, few_shot, solve

RESULTS = Path(__file__).parent / "results"
TARGETS = ("movie_polarity", "sms_spam", "crowdflower_sentiment3")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class PeakRSS:
    """Peak resident memory while inside (sampled every 10 ms), minus the level at entry."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def increase(self) -> float:
        return self.peak - self.start


def run_cell(encoder, task, shots: int, seed: int, params: str, max_eval: int,
             finetune_too: bool) -> dict:
    train = few_shot(task.train, shots, label_kind=task.label_kind, seed=seed)
    test = task.subsample(max_test=max_eval, seed=0).test
    ft = FewShotFinetuneSettings(seed=seed)
    torch.manual_seed(seed)
    model = TaskModel(encoder, task.num_labels, dropout=ft.dropout)
    start = copy.deepcopy(model) if finetune_too else None  # the encoder stays untouched
    with PeakRSS() as mem_k:
        km = compute_kernel(ClassifierFormulation(model), train.inputs(), test.inputs(),
                            kernel="sgd", params=params, include_head=True, progress=False)
    out = {"target": task.task_id, "shots": shots, "seed": seed, "params": params,
           "num_train": len(train), "num_test": len(test), "num_params": km.num_params,
           "kernel_seconds": km.seconds, "kernel_peak_rss_increase_mib": mem_k.increase,
           "kernel_peak_rss_mib": mem_k.peak,
           "held_gradient_mib": km.held_gradient_bytes / 2**20,
           "kernel_ms_per_example": 1000 * km.seconds / km.gradient_passes}
    for solver in ("regression", "logistic"):
        t = time.perf_counter()
        pred = solve(km, train.labels, label_kind="classification",
                     settings=KernelSettings(params=params, solver=solver))
        out[f"kernel_{solver}"] = metrics_from_outputs(pred, test.labels, "classification")
        out[f"kernel_{solver}_solve_seconds"] = time.perf_counter() - t
    out["initial"] = metrics_from_outputs(km.f0_eval, test.labels, "classification")
    if start is not None:  # exactly the kernel's starting point, same sample and seed
        t = time.perf_counter()
        with PeakRSS() as mem_f:
            finetune(start, train, label_kind=task.label_kind, settings=ft, progress=False)
        out["finetune_seconds"] = time.perf_counter() - t
        out["finetune_peak_rss_increase_mib"] = mem_f.increase
        out["finetune"] = evaluate(start, task, test)
        out["finetune_settings"] = ft.to_dict()
    return out


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def memory_point(params: str, shots: int, target: str, num_eval: int) -> dict:
    """In a fresh process: peak RSS (VmHWM) rise of one kernel over the loaded model."""
    encoder = load_encoder()
    task = load_builtin(target)
    train = few_shot(task.train, shots, label_kind=task.label_kind, seed=0)
    test = task.subsample(max_test=num_eval, seed=0).test
    torch.manual_seed(0)
    model = TaskModel(encoder, task.num_labels)
    encoder.embed(train.inputs()[:8], progress=False)  # allocator warm-up
    before = _hwm_mib()
    km = compute_kernel(ClassifierFormulation(model), train.inputs(), test.inputs(),
                        kernel="sgd", params=params, progress=False)
    return {"params": params, "shots": shots, "target": target, "num_train": len(train),
            "num_eval": len(test), "num_params": km.num_params,
            "hwm_before_mib": before, "hwm_after_mib": _hwm_mib(),
            "peak_increase_mib": _hwm_mib() - before,
            "held_gradient_mib": km.held_gradient_bytes / 2**20,
            "gradient_passes": km.gradient_passes, "seconds": km.seconds}


def summarise(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    paired = [r for r in rows if "finetune" in r]
    summary: dict = {}
    for params in sorted({r["params"] for r in paired}):
        sel = [r for r in paired if r["params"] == params]
        k = np.array([r["kernel_regression"]["accuracy"] for r in sel])
        kl = np.array([r["kernel_logistic"]["accuracy"] for r in sel])
        f = np.array([r["finetune"]["accuracy"] for r in sel])
        summary[params] = {
            "cells": len(sel),
            "mean_abs_diff_regression_vs_finetune": float(np.mean(np.abs(k - f))),
            "mean_abs_diff_logistic_vs_finetune": float(np.mean(np.abs(kl - f))),
            "spearman_regression_vs_finetune": float(spearmanr(k, f)[0]) if len(sel) > 2
            else None,
            "spearman_logistic_vs_finetune": float(spearmanr(kl, f)[0]) if len(sel) > 2
            else None,
            "median_kernel_seconds": float(np.median([r["kernel_seconds"] for r in sel])),
            "median_finetune_seconds": float(np.median([r["finetune_seconds"] for r in sel])),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--shots", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max-eval", type=int, default=300)
    parser.add_argument("--lastk-shots", nargs="*", type=int, default=[16],
                        help="Shot counts at which the lastk:1 subset is also measured.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the development machine is shared).")
    parser.add_argument("--out", default=str(RESULTS / "kernel.jsonl"))
    parser.add_argument("--memory", action="store_true",
                        help="Instead: peak memory per (subset, shots), a fresh process each, "
                             "written to results/kernel_memory.json.")
    parser.add_argument("--memory-point", nargs=2, metavar=("PARAMS", "SHOTS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.memory_point:
        print(json.dumps(memory_point(args.memory_point[0], int(args.memory_point[1]),
                                      args.targets[0], 50)))
        return
    if args.memory:
        points = []
        for params in ("biases", "lastk:1"):
            for shots in args.shots:
                done = subprocess.run(
                    [sys.executable, __file__, "--memory-point", params, str(shots),
                     "--targets", args.targets[0], "--threads", str(args.threads)],
                    check=True, capture_output=True, text=True)
                points.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(points[-1], flush=True)
        (RESULTS / "kernel_memory.json").write_text(json.dumps(points, indent=2))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["target"], r["shots"], r["seed"], r["params"]) for r in rows}
    encoder = load_encoder()
    tasks = {target: load_builtin(target) for target in args.targets}
    for shots in args.shots:  # smaller size first, then seed by seed: partial runs balance
        for seed in args.seeds:
            for target, task in tasks.items():
                subsets = ["biases"] + (["lastk:1"] if shots in args.lastk_shots else [])
                for params in subsets:
                    key = (target, shots, seed, params)
                    if key in done:
                        continue
                    row = run_cell(encoder, task, shots, seed, params, args.max_eval,
                                   finetune_too=params == "biases")
                    if params != "biases":  # same sample, seed and start: reuse its FT run
                        twin = next((r for r in rows if (r["target"], r["shots"], r["seed"],
                                                         r["params"]) == key[:3] + ("biases",)),
                                    None)
                        if twin is not None:
                            for k in ("finetune", "finetune_seconds", "finetune_settings",
                                      "finetune_peak_rss_increase_mib"):
                                row[k] = twin[k]
                    rows.append(row)
                    with out.open("a") as fh:
                        fh.write(json.dumps(row, sort_keys=True) + "\n")
                    ft = row.get("finetune", {}).get("accuracy", float("nan"))
                    print(f"{target:<24} {shots:>3} shots seed {seed} {params:<8} "
                          f"kernel {row['kernel_regression']['accuracy']:.3f} "
                          f"(logistic {row['kernel_logistic']['accuracy']:.3f}) "
                          f"fine-tuned {ft:.3f} initial {row['initial']['accuracy']:.3f} | "
                          f"kernel {row['kernel_seconds']:.1f}s "
                          f"+{row['kernel_peak_rss_increase_mib']:.0f} MiB"
                          + (f", FT {row['finetune_seconds']:.1f}s" if "finetune_seconds" in row
                             else ""), flush=True)
    summary = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": args.threads, "cpus": os.cpu_count()},
               "settings": vars(args), "by_params": summarise(rows), "cells": len(rows)}
    (out.parent / "kernel.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(json.dumps(summary["by_params"], indent=2))


if __name__ == "__main__":
    main()
