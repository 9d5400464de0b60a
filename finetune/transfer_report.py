"""The transfer report: what a transfer run measured, as JSON, Markdown and plots.

One row per (LR distribution, seed) of :func:`stepstone.finetune.transfer.transfer`:
target metrics with and without the intermediate step (the transfer gain), source
retention and backward transfer, linear probes, per-layer weight drift and CKA
(Kenneweg et al. 2024, arXiv 2404.01317, for the layer-wise LR view of forgetting).
``report.json`` is versioned (:data:`REPORT_FORMAT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepstone.esm.atomic import write_text_atomic

REPORT_FORMAT = 1


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a stage file is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


SUMMARY_METRICS = ("target", "baseline", "gain", "source_before", "source_after",
                   "retention_delta", "retention_ratio", "probe_before", "probe_after")


@dataclass
class TransferReport:
    """Everything a transfer run measured: one row per (distribution, seed).

    ``runs[i]`` holds ``seed``, ``distribution``, ``target``/``baseline`` metric dicts,
    ``gain`` (primary target metric with minus without the intermediate step),
    ``source_before``/``source_after`` (source test metric with its own head),
    ``retention_delta``/``retention_ratio``/``bwt``, ``probe_before``/``probe_after``
    (linear probe of the source task on the frozen source-/target-tuned encoder),
    ``drift``/``cka`` per layer, learning ``curves`` and ``seconds`` per stage.
    """

    target: dict[str, Any]
    source: dict[str, Any]
    settings: dict[str, Any]
    distributions: dict[str, dict[str, float]]
    runs: list[dict[str, Any]]
    primary_metric: str
    probe_base: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = {r["distribution"] for r in self.runs} - set(self.distributions)
        if unknown:
            raise ValueError(f"Runs use distributions {sorted(unknown)} that the report does "
                             f"not describe.")

    def to_pandas(self):
        """One row per run with the scalar measures."""
        import pandas as pd

        rows = []
        for r in self.runs:
            row = {"distribution": r["distribution"], "seed": r["seed"]}
            row.update({k: r[k] for k in SUMMARY_METRICS})
            row.update({f"target_{k}": v for k, v in r["target_metrics"].items()})
            row.update({f"baseline_{k}": v for k, v in r["baseline_metrics"].items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self):
        """Mean and std over seeds per distribution."""
        frame = self.to_pandas()
        if frame.empty:
            return frame
        return frame.groupby("distribution", sort=False)[list(SUMMARY_METRICS)].agg(
            ["mean", "std"])

    def summary_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        frame = self.to_pandas()
        out: dict[str, dict[str, dict[str, float]]] = {}
        for dist, grp in frame.groupby("distribution", sort=False):
            out[str(dist)] = {m: {"mean": float(grp[m].mean()),
                                  "std": float(grp[m].std(ddof=1)) if len(grp) > 1 else 0.0,
                                  "n": int(len(grp))} for m in SUMMARY_METRICS}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "target": self.target, "source": self.source,
                "settings": self.settings, "distributions": self.distributions,
                "primary_metric": self.primary_metric, "probe_base": self.probe_base,
                "runs": self.runs, "summary": self.summary_dict(), "timings": self.timings}

    def __str__(self) -> str:
        m = self.primary_metric
        lines = [f"transfer {self.source['task_id']} -> {self.target['task_id']} "
                 f"({len(self.runs)} runs, metric: {m})"]
        for dist, s in self.summary_dict().items():
            def pm(key, s=s):
                return f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}"
            lines.append(f"  {dist}: target {pm('target')} vs no intermediate "
                         f"{pm('baseline')}, gain {pm('gain')}; source retention "
                         f"{pm('retention_ratio')} (ΔS {pm('retention_delta')})")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        m = self.primary_metric
        src, tgt = self.source, self.target
        out = [f"# Transfer report: {src['task_id']} → {tgt['task_id']}", "",
               f"- Target: `{tgt['task_id']}` ({tgt['num_train']} train / {tgt['num_test']} "
               f"test examples, {tgt['num_labels']} labels); metric: {m}.",
               f"- Source: `{src['task_id']}` ({src['num_train']} train / {src['num_test']} "
               f"test), chosen {src['selected_by']}"
               + (f" (ESM `{src['esm_id']}`)" if src.get("esm_id") else "")
               + f"; source model: {src['source_model']}.",
               f"- Encoder: `{self.settings['encoder']}`; seeds: "
               f"{self.settings['transfer']['seeds']}; fine-tuning: "
               f"{self.settings['transfer']['finetune']['epochs']} epochs, batch "
               f"{self.settings['transfer']['finetune']['batch_size']}"
               + (f"; stabiliser: {self.settings['stabilizer']['kind']} "
                  f"({self.settings['stabilizer']['members']} members)"
                  if self.settings.get("stabilizer") else "") + ".", ""]
        if src.get("ranking"):
            out += ["Ranking (top 5): " + ", ".join(
                f"{r['task_id']} ({r['score']:.3f})" for r in src["ranking"]), ""]
        out += ["## Summary (mean ± std over seeds)", "",
                "| distribution | target | no intermediate | gain | source before | "
                "source after | retention ratio | probe before | probe after |",
                "|---|---|---|---|---|---|---|---|---|"]
        for dist, s in self.summary_dict().items():
            cells = [f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" for k in
                     ("target", "baseline", "gain", "source_before", "source_after",
                      "retention_ratio", "probe_before", "probe_after")]
            out.append(f"| `{dist}` | " + " | ".join(cells) + " |")
        if self.probe_base is not None:
            out += ["", f"Linear probe of the source task on the pre-trained encoder: "
                        f"{self.probe_base:.3f}."]
        out += ["", "## Per seed", "",
                "| distribution | seed | target | no intermediate | gain | ΔS | BWT | "
                "target s | baseline s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.runs:
            out.append(f"| `{r['distribution']}` | {r['seed']} | {r['target']:.3f} | "
                       f"{r['baseline']:.3f} | {r['gain']:+.3f} | {r['retention_delta']:+.3f} | "
                       f"{r['bwt']:+.3f} | {r['seconds']['target']:.0f} | "
                       f"{r['seconds']['baseline']:.0f} |")
        out += ["", "## Learning rates per layer group", "",
                "| group | " + " | ".join(f"`{d}`" for d in self.distributions) + " |",
                "|---|" + "---|" * len(self.distributions)]
        groups = next(iter(self.distributions.values()), {})
        for g in groups:
            out.append(f"| {g} | " + " | ".join(f"{lrs[g]:.2e}" for lrs in
                                              self.distributions.values()) + " |")
        out += ["", "Plots: `lr.png` (learning rate per layer group), `drift.png` (relative "
                "weight drift and linear CKA per layer vs. the pre-trained encoder), "
                "`curves.png` (training loss and target accuracy per epoch), "
                "`retention_gain.png` (source retention vs. target gain per run).", ""]
        return "\n".join(out)

    def save(self, out: str | Path, *, plots: bool = True) -> list[Path]:
        """Write ``report.json``, ``report.md`` and (optionally) the plots; returns paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", self.to_dict())
        (out / "report.md").write_text(self.to_markdown())
        written = [out / "report.json", out / "report.md"]
        if plots and self.runs:
            written += plot_report(self, out)
        return written

    @classmethod
    def load(cls, path: str | Path) -> TransferReport:
        path = Path(path)
        data = json.loads((path / "report.json" if path.is_dir() else path).read_text())
        if data.get("format") != REPORT_FORMAT:
            raise ValueError(f"Unsupported transfer report format {data.get('format')!r}; "
                             f"expected {REPORT_FORMAT}.")
        return cls(data["target"], data["source"], data["settings"], data["distributions"],
                   data["runs"], data["primary_metric"], data.get("probe_base"),
                   data.get("timings", {}))


def plot_report(report: TransferReport, out: Path) -> list[Path]:
    """The four report plots as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    colors = {d: plt.cm.tab10(i % 10) for i, d in enumerate(report.distributions)}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    def stages():
        """(distribution, stage, line style, label, that distribution's runs)."""
        for d in report.distributions:
            runs = [r for r in report.runs if r["distribution"] == d]
            for stage, style in (("transfer", "-"), ("baseline", ":")):
                yield d, stage, style, f"{d} ({stage})", runs

    def per_layer(ax, key: str, title: str) -> None:
        for d, stage, style, label, runs in stages():
            values = [r[key][stage] for r in runs]
            names = list(values[0])
            ax.plot(names, [np.mean([v[n] for v in values]) for n in names], style,
                    marker="o", color=colors[d], label=label)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for d, lrs in report.distributions.items():
        ax.plot(list(lrs), list(lrs.values()), marker="o", label=d, color=colors[d])
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per layer group (bottom → top)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    save(fig, "lr.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    per_layer(ax1, "drift", "Relative weight drift ‖θ−θ₀‖/‖θ₀‖")
    per_layer(ax2, "cka", "Linear CKA with the pre-trained encoder")
    ax1.legend(fontsize=7)
    save(fig, "drift.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for d, stage, style, label, runs in stages():
        losses = [r["curves"][f"{stage}_loss"] for r in runs]
        n = min(len(x) for x in losses)
        mean = np.mean([x[:n] for x in losses], axis=0)
        window = max(1, n // 20)
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
        ax1.plot(np.arange(len(smooth)) + window, smooth, style, color=colors[d], label=label)
        accs = [r["curves"][f"{stage}_epoch_metric"] for r in runs]
        if not accs[0]:  # stabilised runs have no single-model curve
            continue
        ax2.plot(np.arange(1, len(accs[0]) + 1), np.mean(accs, axis=0), style, marker="o",
                 color=colors[d], label=label)
    ax1.set_xlabel("step")
    ax1.set_title("Training loss (mean over seeds)")
    ax2.set_xlabel("epoch")
    ax2.set_title(f"Target {report.primary_metric} (test sample)")
    ax1.legend(fontsize=7)
    save(fig, "curves.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for d in report.distributions:
        runs = [r for r in report.runs if r["distribution"] == d]
        ax.scatter([r["retention_ratio"] for r in runs], [r["gain"] for r in runs],
                   color=colors[d], label=d)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("source retention (after / before)")
    ax.set_ylabel(f"target gain ({report.primary_metric})")
    ax.set_title("Source retention vs. target gain (one point per seed)")
    ax.legend(fontsize=8)
    save(fig, "retention_gain.png")
    return paths
