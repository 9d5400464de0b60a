"""First stage of a ranking: recall of the ESM sketch index, and its cost at 1k-100k ESMs.

A. Real ESMs: every affine ESM of the shipped registry and of the (read-only) matrix
   registries ``benchmarks/work/matrix/*/registry-s0``; every available built-in task
   as a target (training split capped at 1,000, stratified, seed 0; embeddings from
   the cache), each without ESMs of its own task. Exact ESM-LogME ranks them; the
   first stage as ``rank`` runs it (ESM sketch index, :mod:`stepstone.selection.sketch`:
   inner-product search for ``MIDDLE_STAGE_POOL``, then the middle stage
   ``sketch_logme`` on the sketches) keeps K; so do, for comparison, the inner product
   alone (the first-order model) and TextEmb (cosine of mean embeddings, where the row
   has a task vector). Recall@K of the exact top-1 and of the exact top-5, mean over
   targets; for the v1 (shipped) and v2 (matrix run) ESMs apart and together.
B. Synthetic ESMs fitted to the real ones: ``W = mean + sum_j z_j sqrt(l_j) P_j + R``
   where ``mean`` and ``(l_j, P_j)`` are the mean and the principal components of the
   real maps' deviations ``[W_i - mean, b_i - mean_b]`` (z ~ N(0, 1)), and ``R`` a
   random rank-``8`` term inside the real maps' joint row/column spaces whose Frobenius
   norm is ``--residual`` times the real deviations' mean norm (maps that are not
   mere mixtures of the real ones). Same targets (a subset), same recall@K; also with
   inner-product pools of n/10, n/5, n/2 before the middle stage (what the pool of
   ``MIDDLE_STAGE_POOL`` is at 10x, 5x, 2x the registry size).
C. Scale (``--sizes``): registries of 1k/10k/100k rows hard-linked to one real ESM
   folder (files cost nothing), kept in ``work/scale/reg-N`` and made beforehand with
   ``--prepare`` (resumable; the 100k one grows from the 10k one's index): full index
   build, incremental update after adding 1% more rows, ``rank`` with
   ``prefilter=K`` (median over repeats; embedding from the cache), index size on
   disk, and peak RSS of a fresh ``rank`` process (VmHWM) next to the index size.
D. Storage: disk per ESM as stored (float32), float16 and rank-r truncations, with the
   Kendall tau of exact ESM-LogME scores against float32 over the real targets.

    python benchmarks/bench_first_stage.py --prepare --sizes 1000 10000 100000  # niced
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
import time
from pathlib import Path

import numpy as np

from stepstone.esm.model import EmbeddingSpaceMap
from stepstone.selection.logme import TargetBasis
from stepstone.selection.logme_maps import logme_linear_maps
from stepstone.selection.sketch import (
    DEFAULT_SKETCH_RANK,
    MIDDLE_STAGE_POOL,
    fit_sketch_basis,
    sketch_logme,
    sketch_maps,
    target_query,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
KS_REAL = (1, 2, 3, 5, 8, 10, 12, 15)
KS_SYN = (5, 10, 25, 50, 100, 200, 400)


def real_esms(folders: list[str] | None = None) -> dict:
    """Task ids, weights (B, d, d), biases (B, d) and task vectors of the real ESMs."""
    if folders is None:
        folders = [str(ROOT / "esm" / "default_registry")] + sorted(
            glob.glob(str(HERE / "work" / "matrix" / "*" / "registry-s0")))
    from stepstone.esm.registry import Registry

    tasks, ws, bs, vecs, where, seen = [], [], [], [], [], set()
    for folder in folders:
        reg = Registry(folder)
        for e in reg.entries():
            # an exit-layer ESM maps layer-k embeddings, not the full-depth ones the
            # targets are embedded with here; the shipped registry's ESMs are also in
            # the matrix registry they were shipped from (same ids)
            if e.layer is not None or e.id in seen:
                continue
            pair = EmbeddingSpaceMap.load(reg.esm_dir(e.id)).affine()
            if pair is None:
                continue
            seen.add(e.id)
            tasks.append(e.task_id)
            ws.append(pair[0])
            bs.append(pair[1])
            vecs.append(e.task_vector)
            # v1: the paper's AdamW fit (the first shipped registry); v2: closed-form ridge
            where.append("v2" if reg.config(e.id).fit.get("method") == "ridge" else "v1")
        reg.close()
    return {"tasks": tasks, "W": np.stack(ws), "b": np.stack(bs), "vectors": vecs,
            "registry": np.array(where)}


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


def _spread(W: np.ndarray, b: np.ndarray) -> dict:
    """Norms that say how far apart maps are: ``||W||``, ``||W - mean||``, ``||W - I||``
    (Frobenius, quartiles over maps)."""
    flat = np.concatenate([W.reshape(len(W), -1), b], axis=1).astype(np.float64)
    eye = np.eye(W.shape[1], W.shape[2]).ravel()
    q = [25, 50, 75]
    return {"norm": np.percentile(np.linalg.norm(flat, axis=1), q).tolist(),
            "from_mean": np.percentile(np.linalg.norm(flat - flat.mean(0), axis=1), q).tolist(),
            "from_identity": np.percentile(np.linalg.norm(
                W.reshape(len(W), -1) - eye, axis=1), q).tolist()}


def _stages(basis, sketches: np.ndarray, X: np.ndarray, y: np.ndarray, pool: int
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """First-order inner products, and the order ``rank`` uses: the inner-product search
    keeps ``pool``, the middle stage (:func:`sketch_logme`) orders those; seconds per
    stage."""
    from stepstone.selection.threads import single_threaded_blas

    t0 = time.perf_counter()
    with single_threaded_blas():  # as rank's first stage runs it
        first = sketches @ target_query(basis, X, y)
    t1 = time.perf_counter()
    kept = np.argsort(-first, kind="stable")[:pool]
    middle = sketch_logme(basis, X, y, sketches[kept])
    t2 = time.perf_counter()
    order = kept[np.argsort(-middle, kind="stable")]
    return first, order, {"first_order_seconds": t1 - t0, "middle_stage_seconds": t2 - t1,
                          "middle_stage_ms_per_esm": 1e3 * (t2 - t1) / max(len(kept), 1)}


def part_a(esms: dict, targets: dict, rank: int) -> dict:
    from scipy.stats import kendalltau

    W, b = esms["W"], esms["b"]
    tasks = np.array(esms["tasks"])
    groups = {"all": np.ones(len(tasks), bool)}
    where = esms.get("registry", np.full(len(tasks), "all"))
    groups.update({g: where == g for g in sorted(set(where)) if g != "all"})
    exact = {}
    for t, (X, y, _) in targets.items():
        t0 = time.perf_counter()
        exact[t] = logme_linear_maps(TargetBasis(X, y), W, b)
        exact[t + "/seconds"] = time.perf_counter() - t0
    out = {"esms": len(tasks), "targets": len(targets), "sketch_rank": rank,
           "middle_stage_pool": MIDDLE_STAGE_POOL, "by_registry": {}}
    for g, member in groups.items():
        basis = fit_sketch_basis(W[member], b[member], rank=rank)  # each registry its own
        sketches = np.zeros((len(tasks), basis.dim), np.float32)
        sketches[member] = sketch_maps(basis, W[member], b[member])
        ks = [k for k in KS_REAL if k < member.sum() - 1]
        rows, rows_first, rows_te, per_target, costs = [], [], [], {}, []
        for t, (X, y, mean) in targets.items():
            keep = np.flatnonzero(member & (tasks != t))
            ex = exact[t][keep]
            first, order, cost = _stages(basis, sketches[keep], X, y, MIDDLE_STAGE_POOL)
            cost["exact_ms_per_esm"] = 1e3 * exact[t + "/seconds"] / len(tasks)
            costs.append(cost)
            order_exact = np.argsort(-ex)
            rows.append(recall_at(order_exact, order, ks))
            rows_first.append(recall_at(order_exact, np.argsort(-first), ks))
            te = np.array([-np.inf if esms["vectors"][i] is None else
                           float(esms["vectors"][i] @ mean) for i in keep])
            rows_te.append(recall_at(order_exact, np.argsort(-te), ks))
            middle = np.empty(len(keep))
            middle[order] = -np.arange(len(order))
            per_target[t] = {"candidates": len(keep),
                             "kendall_tau_middle": float(kendalltau(ex, middle)[0]),
                             "kendall_tau_first_order": float(kendalltau(ex, first)[0]),
                             "top1_position": int(order.tolist().index(int(np.argmax(ex)))),
                             **cost}
        res = {"esms": int(member.sum()), "targets": len(targets),
               "recall": mean_recall(rows, ks), "recall_first_order": mean_recall(rows_first, ks),
               "recall_textemb": mean_recall(rows_te, ks),
               "kendall_tau_middle": float(np.mean([p["kendall_tau_middle"]
                                                    for p in per_target.values()])),
               "kendall_tau_first_order": float(np.mean([p["kendall_tau_first_order"]
                                                         for p in per_target.values()])),
               "cost": {k: float(np.median([c[k] for c in costs])) for k in costs[0]},
               "spread": _spread(W[member], b[member]), "per_target": per_target}
        out["by_registry"][g] = res
        r = res["recall"]
        print(f"  {g:<4} {res['esms']:>3} ESMs: tau {res['kendall_tau_middle']:.2f} (first order "
              f"{res['kendall_tau_first_order']:.2f}); recall top-1/top-5 "
              + ", ".join(f"K={k} {r[k]['top1']:.2f}/{r[k]['top5']:.2f}" for k in (5, 8)
                          if k in r), flush=True)
    # the headline curves: the whole real set, as the plot shows them
    out.update({k: out["by_registry"]["all"][k] for k in (
        "recall", "recall_first_order", "recall_textemb", "kendall_tau_middle",
        "kendall_tau_first_order", "cost", "spread", "per_target")})
    return out


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
    ks = [k for k in KS_SYN if k < n]
    # pools below n model larger registries: at 10x the size, MIDDLE_STAGE_POOL is n / 10
    pools = sorted({min(MIDDLE_STAGE_POOL, n)} | {p for p in (n // 10, n // 5, n // 2)
                                                  if p >= max(ks)})
    rows, rows_first, rows_pool, costs = [], [], {p: [] for p in pools}, []
    for t, (X, y, _) in targets.items():
        t0 = time.perf_counter()
        exact = logme_linear_maps(TargetBasis(X, y), W, b)
        exact_s = time.perf_counter() - t0
        order_exact = np.argsort(-exact)
        for p in pools:
            first, order, cost = _stages(basis, sketches, X, y, p)
            rows_pool[p].append(recall_at(order_exact, order, ks))
        cost["exact_ms_per_esm"] = 1e3 * exact_s / n
        costs.append(cost)
        rows.append(rows_pool[min(MIDDLE_STAGE_POOL, n)][-1])
        rows_first.append(recall_at(order_exact, np.argsort(-first), ks))
        k = ks[min(3, len(ks) - 1)]
        print(f"  {t:<24} exact {exact_s:.1f}s; top-5 recall@{k}: {rows[-1][k]['top5']:.2f} "
              f"(first order alone {rows_first[-1][k]['top5']:.2f})", flush=True)
    return {"esms": n, "targets": list(targets), "residual": residual, "sketch_rank": rank,
            "sketch_seconds": build_s, "middle_stage_pool": min(MIDDLE_STAGE_POOL, n),
            "recall": mean_recall(rows, ks), "recall_first_order": mean_recall(rows_first, ks),
            "recall_by_pool": {str(p): mean_recall(r, ks) for p, r in rows_pool.items()},
            "cost": {k: float(np.median([c[k] for c in costs])) for k in costs[0]},
            "spread": _spread(W, b), "spread_real": _spread(esms["W"], esms["b"])}


def grow_scaled_registry(folder: Path, n: int, *, chunk: int = 2000, seed: int = 0,
                         progress: bool = True) -> None:
    """Create or grow ``folder`` to ``n`` rows hard-linked to one real ESM folder (so
    files cost nothing; only timings mean something), resumably: rows ``synthetic%06d`` are
    added ``chunk`` at a time (folders linked first, rows committed per chunk), so an
    interrupted run continues where it stopped and a 10k registry grows to 100k."""
    import sqlite3

    from tqdm.auto import tqdm

    from stepstone.esm.registry import DB_NAME, ESM_DIR, Registry, open_registry

    src = open_registry()
    entry = src.entries()[0]
    if not (folder / DB_NAME).exists():
        Registry(folder, "w", create=True).close()
    base = entry.to_dict()
    cols = list(base) + ["task_vector"]
    with sqlite3.connect(folder / DB_NAME) as conn:
        have = conn.execute("SELECT COUNT(*) FROM esms").fetchone()[0]
    bar = tqdm(total=n, initial=have, desc=f"scaled registry {folder.name}", unit="ESM",
               disable=not progress)
    per_seed = 50_000  # file systems cap hard links per inode (ext4: 65,000)
    for start in range(have - have % chunk, n, chunk):
        stop = min(start + chunk, n)
        rng = np.random.default_rng([seed, start])
        vectors = rng.normal(size=(stop - start, entry.in_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = []
        for i in range(start, stop):
            seed_dir = folder.parent / f"{folder.name}-seed{i // per_seed}"
            if not seed_dir.exists():
                shutil.copytree(src.esm_dir(entry.id), seed_dir)
            esm_id = f"synthetic{i:06d}"
            target = folder / ESM_DIR / esm_id
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(seed_dir.iterdir()):
                if f.is_file() and not (target / f.name).exists():
                    os.link(f, target / f.name)
            row = {**base, "id": esm_id, "task_id": esm_id, "settings_key": esm_id,
                   "has_model": 0, "task_vector": vectors[i - start].tobytes()}
            rows.append(tuple(row[c] for c in cols))
        with sqlite3.connect(folder / DB_NAME) as conn:
            conn.executemany(f"INSERT OR IGNORE INTO esms ({', '.join(cols)}) VALUES "
                             f"({', '.join('?' * len(cols))})", rows)
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                         "WHERE key = 'generation'")
        bar.update(stop - max(start, bar.n))
    bar.close()
    src.close()


SCALE = HERE / "work" / "scale"


def prepare_scaled(n: int, *, step: int = 10_000, progress: bool = True) -> Path:
    """``work/scale/reg-<n>``: ``n`` rows plus the 1% part C adds back, indexed. Grows
    and indexes ``step`` rows at a time (resumable, niced work before the timed runs);
    a new folder starts from the largest smaller one's index files (the same ids and
    weights), so a 100k index grows from the 10k one instead of from nothing."""
    import json as _json

    from stepstone.esm.registry import DB_NAME, Registry
    from stepstone.selection.index import (
        INDEX_FILE,
        INDEX_META,
        SKETCH_BASIS,
        SKETCH_FILE,
        SKETCH_META,
        update_indexes,
    )

    folder = SCALE / f"reg-{n}"
    total = n + max(n // 100, 1)
    smaller = sorted((int(p.name[4:]) for p in SCALE.glob("reg-*") if p.name[4:].isdigit()
                      and int(p.name[4:]) < n and (p / SKETCH_META).exists()), reverse=True)
    if not (folder / DB_NAME).exists() and smaller:
        folder.mkdir(parents=True)
        for name in (SKETCH_FILE, SKETCH_META, SKETCH_BASIS, INDEX_FILE, INDEX_META):
            shutil.copy(SCALE / f"reg-{smaller[0]}" / name, folder / name)
        for meta in (SKETCH_META, INDEX_META):  # never "current" by a chance equal number
            data = _json.loads((folder / meta).read_text())
            (folder / meta).write_text(_json.dumps({**data, "generation": -1}))
    for m in [*range(step, total, step), total]:
        grow_scaled_registry(folder, m, progress=progress)
        reg = Registry(folder, "w")
        t0 = time.perf_counter()
        update_indexes(reg)
        if progress:
            print(f"  reg-{n}: {len(reg)} rows indexed ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        reg.close()
    return folder


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


def part_c(sizes: list[int], repeats: int, prefilter: int, target: str, *,
           full_build: bool = True) -> dict:
    from stepstone.esm.registry import Registry
    from stepstone.selection.index import (
        SKETCH_BASIS,
        SKETCH_FILE,
        SKETCH_META,
        sketch_index,
        task_index,
    )
    from stepstone.selection.ranking import rank

    rank(target, None, progress=False)  # fills the embedding cache
    out = {}
    for n in sizes:
        folder = prepare_scaled(n, progress=False)  # a no-op once prepared
        grow = max(n // 100, 1)
        reg = Registry(folder, "w")
        extra = [f"synthetic{i:06d}" for i in range(n, n + grow)]
        # the last 1% are held back: removed from the manifest rows (files stay)
        marks = ",".join("?" * grow)
        with reg.conn:
            rows = reg.conn.execute(f"SELECT * FROM esms WHERE id IN ({marks})",
                                    extra).fetchall()
            reg.conn.execute(f"DELETE FROM esms WHERE id IN ({marks})", extra)
            reg._bump_generation()
        build = None
        if full_build:
            for name in (SKETCH_FILE, SKETCH_META, SKETCH_BASIS):
                (folder / name).unlink(missing_ok=True)
            t0 = time.perf_counter()
            sketch_index(reg, mmap=False)
            build = time.perf_counter() - t0
        else:
            sketch_index(reg, mmap=False)  # drops the held-back rows
        with reg.conn:
            reg.conn.executemany(
                f"INSERT INTO esms VALUES ({','.join('?' * len(rows[0]))})", rows)
            reg._bump_generation()
        t0 = time.perf_counter()
        sketch_index(reg, mmap=False)
        update = time.perf_counter() - t0
        task_index(reg)  # leaves both indexes current (`registry verify` checks them)
        reg.close()
        ro = Registry(folder)
        times, stages = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            r = rank(target, ro, prefilter=prefilter, progress=False)
            times.append(time.perf_counter() - t)
            stages.append(r.timings)
        ro.close()
        child = _rss_child(str(folder), target, prefilter)
        index_bytes = (folder / SKETCH_FILE).stat().st_size
        out[n] = {"build_seconds": build, "update_seconds": update, "update_added": grow,
                  "rows": n + grow, "index_mib": index_bytes / 2**20,
                  "index_kib_per_esm": index_bytes / 1024 / (n + grow),
                  "rank_seconds": times, "median_rank_seconds": statistics.median(times),
                  "median_stages": {k: statistics.median(s[k] for s in stages)
                                    for k in stages[0]},
                  "peak_rss_mib_fresh_process": child["peak_rss_mib"],
                  "fresh_process_timings": child["timings"]}
        shown = "not run" if build is None else f"{build:.1f}s"
        print(f"  {n:>7}: build {shown}, +{grow} update {update:.2f}s, rank "
              f"{out[n]['median_rank_seconds']:.2f}s (prefilter={prefilter}; stages "
              f"{out[n]['median_stages']}), index {out[n]['index_mib']:.0f} MiB, peak RSS "
              f"{child['peak_rss_mib']:.0f} MiB", flush=True)
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

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, title in ((axes[0], "A", "real ESMs"), (axes[1], "B", "synthetic ESMs")):
        part = results.get(key)
        if not part:
            ax.set_visible(False)
            continue
        keys = sorted(part["recall"], key=int)
        ks = [int(k) for k in keys]
        for metric, style in (("top1", "-o"), ("top5", "-s")):
            name = metric.replace("top", "top-")
            ax.plot(ks, [part["recall"][k][metric] for k in keys], style,
                    label=f"sketch index + middle stage, exact {name}")
            if "recall_first_order" in part:
                ax.plot(ks, [part["recall_first_order"][k][metric] for k in keys],
                        marker=style[-1], alpha=0.6, ls="-.",
                        label=f"first-order inner product alone, exact {name}")
            pools = part.get("recall_by_pool", {})
            smallest = min(pools, key=int, default=None)
            if smallest is not None and int(smallest) < part["esms"]:
                ax.plot(ks, [pools[smallest][k][metric] for k in keys], marker=style[-1],
                        alpha=0.6, ls=(0, (1, 1)),
                        label=f"pool {smallest} (= {MIDDLE_STAGE_POOL} at "
                              f"{part['esms'] * MIDDLE_STAGE_POOL // int(smallest):,} ESMs), "
                              f"exact {name}")
            if "recall_textemb" in part:
                ax.plot(ks, [part["recall_textemb"][k][metric] for k in keys],
                        marker=style[-1], alpha=0.4, ls="--",
                        label=f"TextEmb, exact {metric.replace('top', 'top-')}")
        ax.plot(ks, [min(k / part["esms"], 1.0) for k in ks], ":", color="grey",
                label="random cut (expected)")
        ax.axhline(0.95, color="#cc3311", lw=0.8, label="goal 0.95")
        if key == "B":
            ax.set_xscale("log")
        ax.set_xlabel("K kept by the first stage")
        ax.set_ylabel("recall of the exact ESM-LogME best")
        ax.set_ylim(0, 1.03)
        n_targets = part["targets"] if isinstance(part["targets"], int) else len(part["targets"])
        ax.set_title(f"{title}: {part['esms']} ESMs, {n_targets} targets")
        ax.legend(fontsize=6, loc="lower right")
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
    parser.add_argument("--prepare", action="store_true",
                        help="Only make and index the part C registries (work/scale/reg-N; "
                             "resumable, slow at 100k: run it niced before the timed runs).")
    parser.add_argument("--no-full-build", action="store_true",
                        help="Part C: skip the full index build (time the update only).")
    parser.add_argument("--out", default=str(RESULTS / "first_stage.json"))
    args = parser.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"cpu_count": os.cpu_count()})
    if args.prepare:
        for n in args.sizes:
            print(f"preparing {prepare_scaled(n)}", flush=True)
        return
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
        new = {str(k): v for k, v in part_c(args.sizes, args.repeats, args.prefilter,
                                             args.target,
                                             full_build=not args.no_full_build).items()}
        for k, v in new.items():  # --no-full-build keeps an earlier run's build time
            earlier = results.get("C", {}).get(k, {}).get("build_seconds")
            if v["build_seconds"] is None and earlier is not None:
                v.update(build_seconds=earlier, build_from_earlier_run=True)
        results["C"] = {**results.get("C", {}), **new}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # re-read: another run may have written other parts meanwhile; replace only ours
    ran = {p: results[p] for p in args.parts if p in results}
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update({"cpu_count": os.cpu_count(), **ran})
    out_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    plot(results, out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
