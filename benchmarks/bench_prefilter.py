"""FAISS prefilter: recall of the exact ESM-LogME top-5 among the K kept.

For every built-in target, rank the shipped registry's sources exactly with
ESM-LogME, then with ``--prefilter K``; the recall is the share of the exact top-5
that survives the prefilter (mean over targets). Rank time at registry scale (1k to
100k sources) is part C of ``bench_first_stage.py``.

    python benchmarks/bench_prefilter.py [--ks 3 5 8]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from stepstone.esm.catalog import builtin_ids, is_available
from stepstone.esm.registry import open_registry
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--out", default=str(RESULTS / "prefilter.json"))
    args = parser.parse_args()

    print("Recall of the exact ESM-LogME top-5 after the FAISS prefilter (shipped registry)")
    recall = recall_on_shipped(tuple(args.ks))
    for k, v in recall["mean"].items():
        print(f"  K={k:<3} mean recall@5 {v:.3f} over {len(recall['per_target'])} targets")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"recall": recall, "cpu_count": os.cpu_count()},
                                         indent=2) + "\n")

if __name__ == "__main__":
    main()
