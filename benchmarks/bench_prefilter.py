"""FAISS prefilter: recall of the exact ESM-LogME top-5, and rank time at registry scale.

Part A (real): for every built-in target, rank the shipped registry's sources
exactly with ESM-LogME, then with ``--prefilter K``; the recall is the share of
the exact top-5 that survives the prefilter (mean over targets).

Part B (scale): registries of 1k, 10k and 100k sources, made by hard-linking one
real ESM folder under new ids (so files cost nothing) with random task vectors,
ranked for one target with ``prefilter=100``: wall time of the whole ``rank``
call (embedding from the cache), median over repeats, with its stages.

    python benchmarks/bench_prefilter.py [--sizes 1000 10000 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from stepstone.esm.catalog import builtin_ids, is_available
from stepstone.esm.registry import DB_NAME, ESM_DIR, Registry, open_registry
from stepstone.selection.ranking import rank

RESULTS = Path(__file__).parent / "results"
LINKS_PER_SEED = 50_000


def recall_on_shipped(ks: tuple[int, ...]) -> dict:
    reg = open_registry()
    per_target = {}
    for task in [t for t in builtin_ids() if is_available(t)]:
        exact = rank(f"builtin:{task}", reg, progress=False)
        top5 = set(exact.task_ids[:5])
        row = {}
        for k in ks:
            pre = rank(f"builtin:{task}", reg, prefilter=k, progress=False)
            row[k] = len(top5 & set(pre.task_ids)) / len(top5)
        per_target[task] = row
    mean = {k: float(np.mean([r[k] for r in per_target.values()])) for k in ks}
    return {"candidates_per_target": len(reg) - 1, "per_target": per_target, "mean": mean}


def make_scaled_registry(folder: Path, n: int, seed: int = 0) -> Registry:
    """A registry of ``n`` rows sharing one real ESM's files through hard links."""
    src = open_registry()
    entry = src.entries()[0]
    reg = Registry(folder, "w", create=True)
    reg.close()
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, entry.in_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    base = entry.to_dict()
    files: list[Path] = []
    for i in range(n):
        if i % LINKS_PER_SEED == 0:  # file systems cap hard links per inode (ext4: 65,000)
            seed = folder.parent / f"seed{i // LINKS_PER_SEED}"
            shutil.copytree(src.esm_dir(entry.id), seed)
            files = [p for p in seed.iterdir() if p.is_file()]
        esm_id = f"synthetic{i:06d}"
        target = folder / ESM_DIR / esm_id
        target.mkdir(parents=True)
        for f in files:
            os.link(f, target / f.name)
        row = {**base, "id": esm_id, "task_id": f"synthetic{i:06d}", "settings_key": esm_id,
               "has_model": 0, "task_vector": vectors[i].tobytes()}
        rows.append(row)
    cols = list(rows[0])
    with sqlite3.connect(folder / DB_NAME) as conn:
        conn.executemany(f"INSERT INTO esms ({', '.join(cols)}) VALUES "
                         f"({', '.join('?' * len(cols))})", [tuple(r[c] for c in cols)
                                                             for r in rows])
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'generation'")
    return Registry(folder)


def scale(sizes: list[int], repeats: int, prefilter: int, target: str) -> dict:
    out = {}
    rank(target, None, progress=False)  # fills the embedding cache
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"stepstone-scale-{n}-"))
        try:
            t0 = time.perf_counter()
            reg = make_scaled_registry(tmp / "reg", n)
            made = time.perf_counter() - t0
            # A writable open lets the first rank save index.faiss.
            first = rank(target, Registry(tmp / "reg", "w"), prefilter=prefilter, progress=False)
            times, stages = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                r = rank(target, reg, prefilter=prefilter, progress=False)
                times.append(time.perf_counter() - t)
                stages.append(r.timings)
            out[n] = {"create_seconds": made, "first_rank_seconds_incl_index_build":
                      first.timings["total"], "rank_seconds": times,
                      "median_rank_seconds": statistics.median(times),
                      "median_stages": {k: statistics.median(s[k] for s in stages)
                                        for k in stages[0]},
                      "ranked": len(r)}
            print(f"  {n:>7} sources: rank with prefilter={prefilter} "
                  f"{out[n]['median_rank_seconds']:.2f}s (median of {repeats}); stages "
                  f"{out[n]['median_stages']}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefilter", type=int, default=100)
    parser.add_argument("--target", default="builtin:movie_polarity")
    parser.add_argument("--skip-recall", action="store_true", help="Only part B.")
    parser.add_argument("--out", default=str(RESULTS / "prefilter.json"))
    args = parser.parse_args()

    recall = None
    if not args.skip_recall:
        print("A. recall of the exact ESM-LogME top-5 after the FAISS prefilter "
              "(shipped registry)")
        recall = recall_on_shipped(tuple(args.ks))
        for k, v in recall["mean"].items():
            print(f"  K={k:<3} mean recall@5 {v:.3f} over {len(recall['per_target'])} targets")
    print("B. rank wall time at registry scale (1,000-example target, embeddings cached)")
    timing = scale(args.sizes, args.repeats, args.prefilter, args.target)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if recall is None and Path(args.out).exists():  # keep part A of an earlier run
        recall = json.loads(Path(args.out).read_text()).get("recall")
    Path(args.out).write_text(json.dumps({"recall": recall, "scale": timing,
                                          "prefilter": args.prefilter,
                                          "cpu_count": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
