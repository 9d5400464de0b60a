"""Do ESM-LogME's two per-map routes rank real ESMs the same?

``evidence_linear_maps`` scores a map by tridiagonal solves (no eigenvectors) where
that is cheaper, else by the eigenvectors of the same tridiagonal form
(``selection/logme_maps.py``). This scores every affine ESM of the shipped registry
and of the matrix registries (``benchmarks/work/matrix/*/registry-s0``) against every
built-in classification target, at its 1,000-example cap and at its first 200
examples (n < d + 1, where LogME's noise-free limit exists), both ways, and reports
the largest score difference and Kendall's tau per ranking. Passes when every score
agrees to 1e-9 and every tau is 1. Writes ``results/logme_routes.json``.

    python benchmarks/check_logme_routes.py [--small 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_first_stage as bf  # noqa: E402  (the real ESMs and targets, as part A loads them)
from bench_rank import stepstone_route  # noqa: E402

from stepstone.selection import logme_maps  # noqa: E402
from stepstone.selection.logme import TargetBasis  # noqa: E402
from stepstone.selection.logme_maps import logme_linear_maps  # noqa: E402


def both_routes(basis: TargetBasis, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """ESM-LogME by the library's choice of route, and with eigenvectors throughout
    (bench_rank's ``eigvec`` candidate)."""
    auto = logme_linear_maps(basis, W, b)
    with stepstone_route("eigvec"):
        return auto, logme_linear_maps(basis, W, b)


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import kendalltau

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200,
                        help="Examples of the small version of every target.")
    parser.add_argument("--out", default=str(HERE / "results" / "logme_routes.json"))
    args = parser.parse_args(argv)
    esms = bf.real_esms()
    W, b = esms["W"], esms["b"]
    rows = []
    for t, (X, y, _) in bf.load_targets(None).items():
        for n in (len(y), min(args.small, len(y))):
            if len(np.unique(y[:n])) < 2:
                continue
            basis = TargetBasis(X[:n], y[:n])
            auto, eig = both_routes(basis, W, b)
            rows.append({"target": t, "n": n, "columns": basis.n_targets,
                         "tridiagonal": basis.n_targets <= logme_maps._TRIDIAGONAL_MAX_K,
                         "max_abs_diff": float(np.max(np.abs(auto - eig))),
                         "kendall_tau": float(kendalltau(auto, eig).statistic)})
            print(f"{t:<24} n={n:<5} k={basis.n_targets:<4} max|diff| "
                  f"{rows[-1]['max_abs_diff']:.1e}  tau {rows[-1]['kendall_tau']:.3f}",
                  flush=True)
    worst = max(r["max_abs_diff"] for r in rows)
    ok = worst <= 1e-9 and all(r["kendall_tau"] == 1.0 for r in rows)
    summary = {"esms": len(esms["tasks"]), "rankings": len(rows), "max_abs_diff": worst,
               "min_kendall_tau": min(r["kendall_tau"] for r in rows), "passed": ok,
               "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows)} rankings of {len(esms['tasks'])} ESMs: max |diff| {worst:.1e}, "
          f"min tau {summary['min_kendall_tau']:.3f}: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
