"""First stage of a ranking: recall of the ESM sketch index, and its cost at 1k-100k ESMs.

A. Real ESMs: every affine ESM of the shipped registry and of the (read-only) matrix
   registries ``benchmarks/work/matrix/*/registry-s0``; every available built-in task
   as a target (training split capped at 1,000, stratified, seed 0; embeddings from
   the cache), each without ESMs of its own task. Exact ESM-LogME ranks them; the
   first stage (ESM sketch index, :mod:`stepstone.selection.sketch`) and, as the old
   baseline, TextEmb (cosine of mean embeddings, where the row has a task vector) keep
   K. Recall@K of the exact top-1 and of the exact top-5, mean over targets.
B. Synthetic ESMs fitted to the real ones: ``W = mean + sum_j z_j sqrt(l_j) P_j + R``
   where ``mean`` and ``(l_j, P_j)`` are the mean and the principal components of the
   real maps' deviations ``[W_i - mean, b_i - mean_b]`` (z ~ N(0, 1)), and ``R`` a
   random rank-``8`` term inside the real maps' joint row/column spaces whose Frobenius
   norm is ``--residual`` times the real deviations' mean norm (maps that are not
   mere mixtures of the real ones). Same targets (a subset), same recall@K.
C. Scale (``--sizes``): registries of 1k/10k/100k rows hard-linked to one real ESM
   folder (files cost nothing; made by bench_prefilter.make_scaled_registry):
   full index build, incremental update after adding 1% more rows, ``rank`` with
   ``prefilter=K`` (median over repeats; embedding from the cache), index size on
   disk, and peak RSS of a fresh ``rank`` process (VmHWM) next to the index size.
D. Storage: disk per ESM as stored (float32), float16 and rank-r truncations, with the
   Kendall tau of exact ESM-LogME scores against float32 over the real targets.

    python benchmarks/bench_first_stage.py [--parts A B C D] [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stepstone.esm.model import EmbeddingSpaceMap
from stepstone.selection.logme import TargetBasis
from stepstone.selection.logme_maps import logme_linear_maps
from stepstone.selection.sketch import (
    DEFAULT_SKETCH_RANK,
    fit_sketch_basis,
    sketch_maps,
    target_query,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
KS_REAL = (1, 2, 3, 5, 8, 10, 12, 15)
KS_SYN = (10, 25, 50, 100, 200, 400)


def real_esms(folders: list[str] | None = None) -> dict:
    """Task ids, weights (B, d, d), biases (B, d) and task vectors of the real ESMs."""
    if folders is None:
        folders = [str(ROOT / "esm" / "default_registry")] + sorted(
            glob.glob(str(HERE / "work" / "matrix" / "*" / "registry-s0")))
    from stepstone.esm.registry import Registry

    tasks, ws, bs, vecs = [], [], [], []
    for folder in folders:
        reg = Registry(folder)
        for e in reg.entries():
            pair = EmbeddingSpaceMap.load(reg.esm_dir(e.id)).affine()
            if pair is None:
                continue
            tasks.append(e.task_id)
            ws.append(pair[0])
            bs.append(pair[1])
            vecs.append(e.task_vector)
        reg.close()
    return {"tasks": tasks, "W": np.stack(ws), "b": np.stack(bs), "vectors": vecs}


def load_targets(names: list[str] | None, max_examples: int = 1000) -> dict:
    """Base embeddings and labels of built-in targets (through the embedding cache)."""
    from stepstone.esm.cache import EmbeddingCache
    from stepstone.esm.catalog import builtin_ids, is_available
    from stepstone.esm.registry import open_registry
    from stepstone.esm.specs import load_task
    from stepstone.selection.ranking import prepare_target, registry_encoder

    enc = registry_encoder(open_registry(), None)
    out = {}
    for t in names or [t for t in builtin_ids() if is_available(t)]:
        task = load_task(f"builtin:{t}")
        if task.label_kind != "classification":
            continue
        p = prepare_target(task, enc, max_examples=max_examples, cache=EmbeddingCache())
        out[t] = (p.X, np.asarray(p.labels), p.mean_vector)
    return out


def recall_at(order_exact: np.ndarray, order_proxy: np.ndarray, ks) -> dict:
    top1, top5 = order_exact[0], set(order_exact[:5].tolist())
    return {k: {"top1": float(top1 in set(order_proxy[:k].tolist())),
                "top5": len(top5 & set(order_proxy[:k].tolist())) / len(top5)} for k in ks}


def mean_recall(rows: list[dict], ks) -> dict:
    return {k: {m: float(np.mean([r[k][m] for r in rows])) for m in ("top1", "top5")}
            for k in ks}


def part_a(esms: dict, targets: dict, rank: int) -> dict:
    W, b = esms["W"], esms["b"]
    basis = fit_sketch_basis(W, b, rank=rank)
    sketches = sketch_maps(basis, W, b)
    tasks = np.array(esms["tasks"])
    rows, rows_te, per_target = [], [], {}
    ks = [k for k in KS_REAL if k < len(tasks) - 1]
    for t, (X, y, mean) in targets.items():
        keep = np.flatnonzero(tasks != t)
        exact = logme_linear_maps(TargetBasis(X, y), W[keep], b[keep])
        t0 = time.perf_counter()
        proxy = sketches[keep] @ target_query(basis, X, y)
        query_s = time.perf_counter() - t0
        r = recall_at(np.argsort(-exact), np.argsort(-proxy), ks)
        rows.append(r)
        te = np.array([-np.inf if esms["vectors"][i] is None else
                       float(esms["vectors"][i] @ mean) for i in keep])
        rows_te.append(recall_at(np.argsort(-exact), np.argsort(-te), ks))
        from scipy.stats import kendalltau

        per_target[t] = {"candidates": len(keep), "kendall_tau": float(kendalltau(exact,
                                                                                  proxy)[0]),
                         "query_seconds": query_s, "top1_position": int(
                             np.argsort(-proxy).tolist().index(int(np.argmax(exact))))}
        print(f"  {t:<24} tau {per_target[t]['kendall_tau']:+.2f}  exact top-1 at first-stage "
              f"position {per_target[t]['top1_position']}", flush=True)
    return {"esms": len(tasks), "targets": len(targets), "sketch_rank": rank,
            "recall": mean_recall(rows, ks), "recall_textemb": mean_recall(rows_te, ks),
            "per_target": per_target}


def synthetic_maps(esms: dict, n: int, *, residual: float = 0.5, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` maps with the real maps' mean, deviation covariance and spread (see B)."""
    rng = np.random.default_rng(seed)
    W, b = esms["W"].astype(np.float32), esms["b"].astype(np.float32)
    d = W.shape[1]
    flat = np.concatenate([W.reshape(len(W), -1), b], axis=1)
    mean = flat.mean(0)
    dev = flat - mean
    _, s, Vt = np.linalg.svd(dev, full_matrices=False)
    sd = s / np.sqrt(max(len(W) - 1, 1))
    # joint row / column spaces of the real maps, for the residual term
    Ur = np.linalg.svd(W.transpose(1, 0, 2).reshape(d, -1), full_matrices=False)[0][:, :64]
    Vr = np.linalg.svd(W.reshape(-1, d), full_matrices=False)[2][:64].T
    dev_norm = float(np.linalg.norm(dev, axis=1).mean())
    out_w = np.empty((n, d, d), np.float32)
    out_b = np.empty((n, d), np.float32)
    for i in range(n):
        z = rng.normal(size=len(sd)).astype(np.float32)
        m = mean + (z * sd) @ Vt
        A = Ur @ rng.normal(size=(Ur.shape[1], 8)).astype(np.float32)
        B = rng.normal(size=(8, Vr.shape[1])).astype(np.float32) @ Vr.T
        R = A @ B
        R *= residual * dev_norm / max(float(np.linalg.norm(R)), 1e-12)
        out_w[i] = m[:d * d].reshape(d, d) + R
        out_b[i] = m[d * d:]
    return out_w, out_b


def part_b(esms: dict, targets: dict, n: int, rank: int, residual: float) -> dict:
    W, b = synthetic_maps(esms, n, residual=residual)
    t0 = time.perf_counter()
    basis = fit_sketch_basis(W[:2000], b[:2000], rank=rank)
    sketches = sketch_maps(basis, W, b)
    build_s = time.perf_counter() - t0
    rows = []
    ks = [k for k in KS_SYN if k < n]
    for t, (X, y, _) in targets.items():
        t0 = time.perf_counter()
        exact = logme_linear_maps(TargetBasis(X, y), W, b)
        exact_s = time.perf_counter() - t0
        proxy = sketches @ target_query(basis, X, y)
        rows.append(recall_at(np.argsort(-exact), np.argsort(-proxy), ks))
        k = ks[min(2, len(ks) - 1)]
        print(f"  {t:<24} exact {exact_s:.1f}s; top-5 recall@{k} {rows[-1][k]['top5']:.2f}",
              flush=True)
    return {"esms": n, "targets": list(targets), "residual": residual, "sketch_rank": rank,
            "sketch_seconds": build_s, "recall": mean_recall(rows, ks)}


def _rss_child(registry: str, target: str, prefilter: int) -> dict:
    code = (
        "import json,sys,time\n"
        "from stepstone.esm.registry import Registry\n"
        "from stepstone.selection.ranking import rank\n"
        f"r=rank({target!r}, Registry({registry!r}), prefilter={prefilter}, progress=False)\n"
        "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'peak_rss_mib': int(hwm)/1024, 'timings': r.timings}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_c(sizes: list[int], repeats: int, prefilter: int, target: str) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_prefilter import make_scaled_registry

    from stepstone.esm.registry import Registry
    from stepstone.selection.index import SKETCH_FILE, sketch_index
    from stepstone.selection.ranking import rank

    rank(target, None, progress=False)  # fills the embedding cache
    out = {}
    scratch = HERE / "work" / "scale"
    scratch.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"first-stage-{n}-", dir=scratch))
        try:
            grow = max(n // 100, 1)
            make_scaled_registry(tmp / "reg", n + grow).close()
            reg = Registry(tmp / "reg", "w")
            extra = [e.id for e in reg.entries()][-grow:]
            # the last 1% are held back: removed from the manifest rows (files stay)
            with reg.conn:
                rows = reg.conn.execute(
                    f"SELECT * FROM esms WHERE id IN ({','.join('?' * grow)})",
                    extra).fetchall()
                reg.conn.execute(f"DELETE FROM esms WHERE id IN ({','.join('?' * grow)})",
                                 extra)
            t0 = time.perf_counter()
            sketch_index(reg, mmap=False)
            build = time.perf_counter() - t0
            with reg.conn:
                reg.conn.executemany(
                    f"INSERT INTO esms VALUES ({','.join('?' * len(rows[0]))})", rows)
                reg._bump_generation()
            t0 = time.perf_counter()
            sketch_index(reg, mmap=False)
            update = time.perf_counter() - t0
            reg.close()
            ro = Registry(tmp / "reg")
            times, stages = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                r = rank(target, ro, prefilter=prefilter, progress=False)
                times.append(time.perf_counter() - t)
                stages.append(r.timings)
            child = _rss_child(str(tmp / "reg"), target, prefilter)
            out[n] = {"build_seconds": build, "update_seconds": update, "update_added": grow,
                      "index_mib": (tmp / "reg" / SKETCH_FILE).stat().st_size / 2**20,
                      "rank_seconds": times, "median_rank_seconds": statistics.median(times),
                      "median_stages": {k: statistics.median(s[k] for s in stages)
                                        for k in stages[0]},
                      "peak_rss_mib_fresh_process": child["peak_rss_mib"]}
            print(f"  {n:>7}: build {build:.1f}s, +{grow} update {update:.2f}s, rank "
                  f"{out[n]['median_rank_seconds']:.2f}s (prefilter={prefilter}), index "
                  f"{out[n]['index_mib']:.0f} MiB, peak RSS {child['peak_rss_mib']:.0f} MiB",
                  flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def part_d(esms: dict, targets: dict, ranks=(32, 64, 128)) -> dict:
    from scipy.stats import kendalltau

    W, b = esms["W"], esms["b"]
    d = W.shape[1]
    variants = {"float32": (W.astype(np.float32), 4 * (d * d + d))}
    variants["float16"] = (W.astype(np.float16).astype(np.float64), 2 * (d * d + d))
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    for r in ranks:
        variants[f"rank{r}-fp16"] = ((U[:, :, :r] * s[:, None, :r]) @ Vt[:, :r],
                                     2 * (2 * d * r + r + d))
    tasks = np.array(esms["tasks"])
    out = {}
    ref = {}
    for t, (X, y, _) in targets.items():
        keep = np.flatnonzero(tasks != t)
        ref[t] = logme_linear_maps(TargetBasis(X, y), W[keep], b[keep])
    for name, (Wv, nbytes) in variants.items():
        taus, same_top1 = [], []
        for t, (X, y, _) in targets.items():
            keep = np.flatnonzero(tasks != t)
            bv = b[keep].astype(np.float16).astype(np.float64) if "16" in name else b[keep]
            sc = logme_linear_maps(TargetBasis(X, y), Wv[keep], bv)
            taus.append(kendalltau(ref[t], sc)[0])
            same_top1.append(float(np.argmax(sc) == np.argmax(ref[t])))
        out[name] = {"bytes_per_esm": nbytes, "min_tau": float(np.min(taus)),
                     "mean_tau": float(np.mean(taus)), "top1_agreement": float(np.mean(same_top1))}
        print(f"  {name:<14} {nbytes / 1024:7.0f} KiB/ESM  tau min {out[name]['min_tau']:.3f} "
              f"mean {out[name]['mean_tau']:.3f}  same top-1 {out[name]['top1_agreement']:.2f}",
              flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "A", "real ESMs"), (axes[1], "B", "synthetic ESMs")):
        part = results.get(key)
        if not part:
            ax.set_visible(False)
            continue
        keys = sorted(part["recall"], key=int)
        ks = [int(k) for k in keys]
        for metric, style in (("top1", "-o"), ("top5", "-s")):
            ax.plot(ks, [part["recall"][k][metric] for k in keys], style,
                    label=f"sketch index, exact {metric.replace('top', 'top-')}")
            if "recall_textemb" in part:
                ax.plot(ks, [part["recall_textemb"][k][metric] for k in keys],
                        marker=style[-1], alpha=0.4, ls="--",
                        label=f"TextEmb, exact {metric.replace('top', 'top-')}")
        ax.plot(ks, [min(k / part["esms"], 1.0) for k in ks], ":", color="grey",
                label="random cut (expected)")
        ax.axhline(0.95, color="#cc3311", lw=0.8, label="goal 0.95")
        ax.set_xlabel("K kept by the first stage")
        ax.set_ylabel("recall of the exact ESM-LogME best")
        ax.set_ylim(0, 1.03)
        n_targets = part["targets"] if isinstance(part["targets"], int) else len(part["targets"])
        ax.set_title(f"{title}: {part['esms']} ESMs, {n_targets} targets")
        ax.legend(fontsize=7, loc="lower right" if key == "A" else "upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["A", "B", "C", "D"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--synthetic", type=int, default=2000)
    parser.add_argument("--synthetic-targets", type=int, default=6)
    parser.add_argument("--residual", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=DEFAULT_SKETCH_RANK)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefilter", type=int, default=100)
    parser.add_argument("--target", default="builtin:movie_polarity")
    parser.add_argument("--targets", nargs="*", default=None)
    parser.add_argument("--registries", nargs="*", default=None)
    parser.add_argument("--out", default=str(RESULTS / "first_stage.json"))
    args = parser.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"cpu_count": os.cpu_count()})
    esms = targets = None
    if {"A", "B", "D"} & set(args.parts):
        esms = real_esms(args.registries)
        targets = load_targets(args.targets)
    if "A" in args.parts:
        print(f"A. recall@K on {len(esms['tasks'])} real ESMs, {len(targets)} targets")
        results["A"] = part_a(esms, targets, args.rank)
    if "B" in args.parts:
        print(f"B. recall@K on {args.synthetic} synthetic ESMs fitted to the real ones")
        sub = dict(list(targets.items())[::max(len(targets) // args.synthetic_targets, 1)]
                   [:args.synthetic_targets])
        results["B"] = part_b(esms, sub, args.synthetic, args.rank, args.residual)
    if "D" in args.parts:
        print("D. storage per ESM and Kendall tau of exact scores against float32")
        results["D"] = part_d(esms, targets)
    if "C" in args.parts:
        print("C. index build, incremental update and rank at scale")
        results["C"] = {**results.get("C", {}), **{str(k): v for k, v in part_c(
            args.sizes, args.repeats, args.prefilter, args.target).items()}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    plot(results, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
