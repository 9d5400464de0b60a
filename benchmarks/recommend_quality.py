"""Recommendation quality: the gain model's "use S / no intermediate step" verdict,
scored leave-one-target-out (LOTO) on a transfer matrix.

For each target T a gain model is fitted, and its interval calibrated, on the other
targets' cells only (``stepstone.selection.gain.loto_predictions``); T's own cells
never reach it. On T:

* regret@1 (points of the best, as in ``selection_quality.py``: 100 * (best - chosen)
  / best, best = max(max_S perf(S, T), perf_none(T))) of the recommendation, where
  "none" chooses perf_none(T); beside: always taking ESM-LogME's top source (plain
  ESM-LogME), the gain model's top source without the "none" answer, and always "none".
* decision accuracy: whether "helps" (predicted gain of the chosen source > min_gain)
  matches the truth (its measured gain > 0); plain ESM-LogME's decision is "its top
  source's ESM-LogME beats the base LogME". Also per cell: the share of T's sources
  whose predicted sign matches the measured sign (ESM-LogME: score > base LogME).
* interval coverage: the share of T's measured gains inside their stated intervals,
  against the nominal level.
* Spearman of predicted vs measured gains over T's sources (ESM-LogME: its scores).

Means over targets with 95% percentile-bootstrap intervals; p: two-sided paired
sign-flip permutation test over targets against plain ESM-LogME
(``stepstone.selection.metrics``). Only LOTO numbers are reported: in-sample fits are
not scored here at all.

The per-target scores are the ``--scores`` file of ``stepstone gain fit`` (no model
is needed to regenerate the numbers):

    python benchmarks/recommend_quality.py \\
        --results benchmarks/results/transfer_matrix.jsonl \\
        --scores benchmarks/results/gain_scores_cc6c61ffb39d.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stepstone.selection.gain import (
    DEFAULT_ALPHA,
    DEFAULT_LEVEL,
    FEATURES,
    cells_from_scores,
    loto_predictions,
)
from stepstone.selection.gain_fit import (
    complete_targets,
    matrix_gains,
    read_matrix,
    restrict_rows,
)
from stepstone.selection.metrics import (
    GroundTruth,
    bootstrap_ci,
    load_ground_truth,
    paired_permutation_test,
    regret_at_k,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def _regret(best: float, chosen: float) -> float:
    return 100.0 * (best - chosen) / best if best else float("nan")


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def per_target_metrics(gt: GroundTruth, scores: dict[str, dict[str, Any]], *,
                       features=FEATURES, alpha: float = DEFAULT_ALPHA,
                       level: float = DEFAULT_LEVEL, min_gain: float = 0.0
                       ) -> dict[str, dict[str, Any]]:
    """{target: metrics} for every complete target, each from a LOTO model."""
    targets = [t for t in complete_targets(gt) if t in scores]
    gains = matrix_gains(gt)
    cells = cells_from_scores({t: scores[t] for t in targets}, gains)
    loto = loto_predictions(cells, features=features, alpha=alpha, level=level)
    out = {}
    for t in targets:
        pred, true = loto[t]["predictions"], loto[t]["gains"]
        assert t not in loto[t]["trained_on"]  # the bookkeeping the tests also check
        perf, base = gt.mean_perf(t), gt.mean_base(t)
        best = max(max(perf.values()), base)
        sources = sorted(pred)
        esm = scores[t]["esm_logme"]
        ref = scores[t]["reference"]
        esm_order = sorted(esm, key=lambda s: (-esm[s], s))  # rank()'s order and tie-break
        top_pred = min(sources, key=lambda s: (-pred[s].gain, s))
        helps = pred[top_pred].gain > min_gain
        chosen = perf[top_pred] if helps else base
        esm_top = esm_order[0]
        out[t] = {
            "recommended": top_pred if helps else None,
            "predicted_gain": pred[top_pred].gain,
            "interval": [pred[top_pred].low, pred[top_pred].high],
            "true_gain_of_pick": true[top_pred],
            "best_true_gain": max(true.values()),
            "esm_logme_top": esm_top,
            "regret@1 recommendation": _regret(best, chosen),
            "regret@1 esm-logme top": regret_at_k(perf, esm_order, 1, baseline=base),
            "regret@1 gain-model top": _regret(best, perf[top_pred]),
            "regret@1 always none": _regret(best, base),
            "decision recommendation": float(helps == (true[top_pred] > 0)),
            "decision esm-logme": float((esm[esm_top] > ref) == (true[esm_top] > 0)),
            "sign agreement recommendation": float(np.mean(
                [(pred[s].gain > min_gain) == (true[s] > 0) for s in sources])),
            "sign agreement esm-logme": float(np.mean(
                [(esm[s] > ref) == (true[s] > 0) for s in sources])),
            "coverage": float(np.mean([pred[s].low <= true[s] <= pred[s].high
                                       for s in sources])),
            "spearman recommendation": _spearman([pred[s].gain for s in sources],
                                                 [true[s] for s in sources]),
            "spearman esm-logme": _spearman([esm[s] for s in sources],
                                            [true[s] for s in sources]),
            "trained_on": loto[t]["trained_on"],
        }
    return out


#: (row name, per-target key, the plain ESM-LogME key it is tested against)
ROWS = (
    ("regret@1: recommendation (none allowed)", "regret@1 recommendation",
     "regret@1 esm-logme top"),
    ("regret@1: esm-logme top (always take)", "regret@1 esm-logme top", None),
    ("regret@1: gain-model top (always take)", "regret@1 gain-model top",
     "regret@1 esm-logme top"),
    ("regret@1: always none", "regret@1 always none", "regret@1 esm-logme top"),
    ("decision accuracy: recommendation", "decision recommendation", "decision esm-logme"),
    ("decision accuracy: esm-logme top > base LogME", "decision esm-logme", None),
    ("sign agreement per source: gain model", "sign agreement recommendation",
     "sign agreement esm-logme"),
    ("sign agreement per source: esm-logme > base LogME", "sign agreement esm-logme", None),
    ("interval coverage", "coverage", None),
    ("Spearman (predicted vs true gain): gain model", "spearman recommendation",
     "spearman esm-logme"),
    ("Spearman (score vs true gain): esm-logme", "spearman esm-logme", None),
)


QUALITY_ROW = ("regret@1: esm-logme top, the quality table's ESMs (p: recommendation vs "
               "this)")
ABLATION_ROWS = (ROWS[0][0], ROWS[4][0], ROWS[8][0], ROWS[9][0])


def summarise(per_target: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean, 95% bootstrap interval and paired p vs plain ESM-LogME for each row."""
    targets = sorted(per_target)
    out = {}
    for name, key, ref in ROWS:
        v = [per_target[t][key] for t in targets]
        finite = [x for x in v if np.isfinite(x)]
        entry = {"key": key, "mean": float(np.mean(finite)) if finite else float("nan"),
                 "ci95": list(bootstrap_ci(v)), "n": len(finite)}
        if ref is not None:
            entry["p_vs_esm_logme"] = paired_permutation_test(
                v, [per_target[t][ref] for t in targets])
        out[name] = entry
    return out


def _summary(per_target: dict[str, dict[str, Any]],
             reference: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """:func:`summarise`, plus the quality table's esm-logme regret@1 on the same targets
    (``reference``: that row's per-target values) when given."""
    summary = summarise(per_target)
    if reference is not None:
        ts = [t for t in sorted(per_target) if t in reference]
        v = [reference[t]["regret@1"] for t in ts]
        summary[QUALITY_ROW] = {
            "key": "quality-table esm-logme regret@1", "mean": float(np.mean(v)),
            "ci95": list(bootstrap_ci(v)), "n": len(v),
            "p_recommendation_vs_this": paired_permutation_test(
                [per_target[t]["regret@1 recommendation"] for t in ts], v)}
    return summary


def evaluate(rows: list[dict[str, Any]], scores_record: dict[str, Any], *,
             protocol_key: str | None = None, metric: str = "accuracy",
             alpha: float = DEFAULT_ALPHA, level: float = DEFAULT_LEVEL,
             min_gain: float = 0.0, quality: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """The JSON summary: settings, per-target values and the summary rows.

    ``quality``: ``selection_quality.json`` of the same protocol; its esm-logme row
    (scored with the matrix runner's own work-registry ESMs, which can differ from the
    registry the scores file was made with) is added as a second reference."""
    gt = load_ground_truth(rows, protocol_key=protocol_key, metric=metric)
    if scores_record.get("protocol_key") != gt.protocol_key:
        raise ValueError(f"The scores are for protocol {scores_record.get('protocol_key')}, "
                         f"the matrix is {gt.protocol_key}.")
    complete = complete_targets(gt)
    if len(complete) < 4:
        raise ValueError(f"Protocol {gt.protocol_key} has {len(complete)} targets with a cell "
                         f"for every source (of {len(gt.targets())} with any); leave-one-"
                         f"target-out needs >= 4.")
    per_target = per_target_metrics(gt, scores_record["targets"], alpha=alpha, level=level,
                                    min_gain=min_gain)
    same = quality is not None and quality.get("protocol_key") == gt.protocol_key
    ref = quality["methods"]["esm-logme"]["per_target"] if same else None
    summary = _summary(per_target, ref)
    # the quality table's pre-registered headline targets (those whose baseline learns),
    # when it has them and they are not all
    head = quality.get("headline") if same else None
    headline = None
    if head and set(per_target) - set(head["targets"]):
        kept = {t: per_target[t] for t in head["targets"] if t in per_target}
        headline = {"rule": head["rule"], "targets": sorted(kept),
                    "summary": _summary(kept, ref) if kept else {}}
    # Exploratory: the same measures for nested feature subsets. The shipped features
    # were fixed before these were computed; picking the best row here would select on
    # the very targets it is scored on.
    ablation = {}
    for k in range(1, len(FEATURES) + 1):
        feats = FEATURES[:k]
        pt = per_target_metrics(gt, scores_record["targets"], features=feats, alpha=alpha,
                                level=level, min_gain=min_gain)
        ablation[" + ".join(feats)] = {name: e for name, e in summarise(pt).items()
                                       if name in ABLATION_ROWS}
    return {"protocol_key": gt.protocol_key, "metric": metric, "level": level,
            "alpha": alpha, "min_gain": min_gain, "features": list(FEATURES),
            "registry": scores_record.get("registry", "?"),
            "targets": sorted(per_target), "complete_targets": len(complete),
            "matrix_targets": len(gt.targets()), "tasks": len(gt.tasks),
            "cell_std_points": 100 * gt.cell_std(), "per_target": per_target,
            "summary": summary, "headline": headline, "ablation": ablation}


def _cells(e: dict[str, Any] | None) -> str:
    """'mean [lo, hi] | p' of a summary row ('—' where the row is missing)."""
    if e is None:
        return "— | —"
    lo, hi = e["ci95"]
    ci = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else ""
    p = next((f"{e[k]:.3f}" for k in ("p_vs_esm_logme", "p_recommendation_vs_this")
              if k in e), "—")
    return f"{e['mean']:.3f}{ci} | {p}"


def markdown(result: dict[str, Any]) -> str:
    """The table section (what ``selection_quality.py`` appends to its table)."""
    s = result["summary"]
    n = len(result["targets"])
    lines = [
        f"### Recommendation (gain model, leave-one-target-out; protocol "
        f"`{result['protocol_key']}`, {n} targets)",
        "",
        f"Ridge gain model on {', '.join(result['features'])} (alpha "
        f"{result['alpha']:g}); {result['level']:.0%} split-conformal intervals from "
        f"held-out-target residuals; recommend the best predicted source when its "
        f"predicted gain > {result['min_gain']:+g} points, else no intermediate step. "
        f"Every number is leave-one-target-out. Mean over targets [95% bootstrap "
        f"interval]; p: paired sign-flip test vs plain ESM-LogME (scored, like the "
        f"features, with the ESMs of `{result['registry']}`). Seed noise of a cell: "
        f"{result['cell_std_points']:.2f} points (std across seeds).",
        "",
    ]
    head = result.get("headline")
    if head:
        lines += [f"Headline: the {len(head['targets'])} targets whose no-intermediate "
                  f"baseline learns (pre-registered: {head['rule']}), beside all {n}.", "",
                  f"| measure | headline ({len(head['targets'])}): mean [95% CI] | p vs "
                  f"esm-logme | all {n}: mean [95% CI] | p vs esm-logme |",
                  "|---|---|---|---|---|"]
    else:
        lines += ["| measure | mean [95% CI] | p vs esm-logme |", "|---|---|---|"]
    for name, e in s.items():
        cells = [_cells(e)] if not head else [_cells(head["summary"].get(name)), _cells(e)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("ablation"):
        lines += ["", "Exploratory, not used to choose the model (its features were fixed "
                  "first; picking a row here would select on the scored targets): the same "
                  "LOTO measures for nested feature sets.", "",
                  "| features | " + " | ".join(ABLATION_ROWS) + " |",
                  "|---|" + "---|" * len(ABLATION_ROWS)]
        for feats, rows in result["ablation"].items():
            cells = []
            for name in ABLATION_ROWS:
                e = rows[name]
                p = f", p {e['p_vs_esm_logme']:.2f}" if "p_vs_esm_logme" in e else ""
                cells.append(f"{e['mean']:.3f}{p}")
            lines.append(f"| {feats} | " + " | ".join(cells) + " |")
    lines += ["", "| target | recommendation | predicted [interval] | measured gain of pick "
              "| best measured gain | esm-logme top |", "|---|---|---|---|---|---|"]
    for t, r in result["per_target"].items():
        lo, hi = r["interval"]
        rec = r["recommended"] or "none"
        lines.append(f"| {t} | {rec} | {r['predicted_gain']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
                     f"{r['true_gain_of_pick']:+.2f} | {r['best_true_gain']:+.2f} | "
                     f"{r['esm_logme_top']} |")
    return "\n".join(lines) + "\n"


def section(results: str | Path, scores: str | Path, *, quality: str | Path | None = None,
            **kw) -> str:
    """The markdown section for ``selection_quality.py``, after a blank line ('' when
    ``scores`` is missing or for another protocol)."""
    scores = Path(scores)
    if not scores.is_file():
        return ""
    record = json.loads(scores.read_text())
    if record.get("protocol_key") != kw.get("protocol_key", record.get("protocol_key")):
        return ""
    q = json.loads(Path(quality).read_text()) if quality and Path(quality).is_file() else None
    rows = read_matrix(results)
    tasks = kw.pop("tasks", None)
    return "\n" + markdown(evaluate(rows if tasks is None else restrict_rows(rows, tasks),
                                     record, quality=q, **kw))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS_DIR / "transfer_matrix.jsonl"))
    parser.add_argument("--scores", default=str(RESULTS_DIR / "gain_scores_cc6c61ffb39d.json"),
                        help="Per-target scores written by `stepstone gain fit --scores`.")
    parser.add_argument("--protocol", default=None)
    parser.add_argument("--tasks", default=None,
                        help="Only the cells among these tasks (comma-separated specs or "
                             "'all' = the benchmark pool; default: every row).")
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1"])
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    parser.add_argument("--min-gain", type=float, default=0.0)
    parser.add_argument("--quality", default=str(RESULTS_DIR / "selection_quality.json"),
                        help="selection_quality.json of the same protocol: its esm-logme row "
                             "is a second reference (skipped when missing or another "
                             "protocol).")
    parser.add_argument("--out", default=None,
                        help="Write JSON and markdown here (default: print only).")
    args = parser.parse_args(argv)
    rows = read_matrix(args.results)
    if args.tasks is not None:
        rows = restrict_rows(rows, args.tasks)
    gt = load_ground_truth(rows, protocol_key=args.protocol, metric=args.metric)
    print(f"protocol {gt.protocol_key}: {len(complete_targets(gt))} of {len(gt.targets())} "
          f"targets have a cell for every one of the {len(gt.tasks) - 1} other tasks")
    if not Path(args.scores).is_file():
        print(f"no scores file {args.scores}: run `stepstone gain fit --matrix "
              f"{args.results} --scores {args.scores} --out MODEL.json` first")
        return 1
    record = json.loads(Path(args.scores).read_text())
    quality = json.loads(Path(args.quality).read_text()) if Path(args.quality).is_file() \
        else None
    result = evaluate(rows, record, protocol_key=args.protocol,
                      metric=args.metric, alpha=args.alpha, level=args.level,
                      min_gain=args.min_gain, quality=quality)
    table = markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"recommend_quality_{result['protocol_key']}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, sort_keys=True,
                                                     default=float) + "\n")
        (out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
