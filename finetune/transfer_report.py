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
from stepstone.finetune.transfer_stats import INTERVAL_METHOD, degenerate, gain_verdict

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
            # one seed has no spread: std None, not a misleading 0
            out[str(dist)] = {m: {"mean": float(grp[m].mean()),
                                  "std": float(grp[m].std(ddof=1)) if len(grp) > 1 else None,
                                  "n": int(len(grp))} for m in SUMMARY_METRICS}
        return out

    def verdicts(self) -> dict[str, dict[str, Any]]:
        """Per distribution: 95% test-set intervals of the seed-mean target and baseline
        metrics and of the gain, and one sentence of verdict (helped, no measurable
        effect, hurt); see :func:`stepstone.finetune.transfer_stats.gain_verdict`."""
        return {dist: gain_verdict(self.primary_metric, s["target"]["mean"],
                                   s["baseline"]["mean"], int(self.target["num_test"]))
                for dist, s in self.summary_dict().items()}

    def warnings(self) -> list[str]:
        """Models whose test predictions are degenerate (one class or value for every
        example, or no better than the most common class): their numbers say nothing
        about transfer."""
        out: list[str] = []
        seen_source: set[int] = set()
        for r in self.runs:
            preds = r.get("predictions") or {}
            run = f"`{r['distribution']}`, seed {r['seed']}"
            models = [("transfer", r["target"], f"target model fine-tuned after the source "
                       f"({run})"),
                      ("baseline", r["baseline"], f"target model fine-tuned without the "
                       f"intermediate step ({run})")]
            if r["seed"] not in seen_source:
                seen_source.add(r["seed"])
                models.insert(0, ("source", r["source_before"],
                                  f"source model (seed {r['seed']}), on the source test set,"))
            for key, value, who in models:
                classes = (self.source if key == "source" else self.target).get("classes")
                why = degenerate(preds.get(key), value, classes)
                if why:
                    out.append(f"The {who} {why}.")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "target": self.target, "source": self.source,
                "settings": self.settings, "distributions": self.distributions,
                "primary_metric": self.primary_metric, "probe_base": self.probe_base,
                "runs": self.runs, "summary": self.summary_dict(), "timings": self.timings,
                "verdicts": self.verdicts(), "warnings": self.warnings()}

    def __str__(self) -> str:
        m = self.primary_metric
        lines = [f"transfer {self.source['task_id']} -> {self.target['task_id']} "
                 f"({len(self.runs)} runs, metric: {m})"]
        verdicts = self.verdicts()
        for dist, s in self.summary_dict().items():
            v = verdicts[dist]
            lines.append(f"  {dist}: target {_cell(s['target'], v['target_interval'])} vs "
                         f"no intermediate {_cell(s['baseline'], v['baseline_interval'])}, "
                         f"gain {_cell(s['gain'], v['gain_interval'], sign=True)}; source "
                         f"retention {_cell(s['retention_ratio'])} (ΔS "
                         f"{_cell(s['retention_delta'], sign=True)})")
            lines.append(f"    {v['sentence']}")
        lines.append(f"  {_spread_note(self)}")
        lines += [f"  WARNING: {w}" for w in self.warnings()]
        lines += self._data_notes()
        return "\n".join(lines)

    def _data_notes(self) -> list[str]:
        """Where each test split came from, and texts the source shares with the target."""
        lines = [f"  {who} test split: {d['split']}" for who, d in
                 (("target", self.target), ("source", self.source)) if d.get("split")]
        leak = self.source.get("leakage") or {}
        if leak.get("normalised"):
            lines.append(f"  WARNING: the source holds {leak['normalised']} of {leak['of']} "
                         f"target texts ({leak['exact']} exact); the gain is inflated.")
        return lines

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
               *[f"-{line[1:]}." for line in self._data_notes()],
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
        if src.get("recommendation"):  # the gain model's prediction, to set beside the gain
            out += [f"Gain model {src['recommendation']['text']}.", ""]
        verdicts = self.verdicts()
        out += ["## Verdict", ""]
        out += [f"- `{dist}`: {v['sentence']}" for dist, v in verdicts.items()]
        out += [f"- **Warning**: {w}" for w in self.warnings()]
        out += ["", "## Summary", "", _spread_note(self), "",
                "| distribution | target | no intermediate | gain | source before | "
                "source after | retention ratio | probe before | probe after |",
                "|---|---|---|---|---|---|---|---|---|"]
        for dist, s in self.summary_dict().items():
            v = verdicts[dist]
            cells = [_cell(s["target"], v["target_interval"]),
                     _cell(s["baseline"], v["baseline_interval"]),
                     _cell(s["gain"], v["gain_interval"], sign=True)]
            cells += [_cell(s[k]) for k in ("source_before", "source_after", "retention_ratio",
                                            "probe_before", "probe_after")]
            out.append(f"| `{dist}` | " + " | ".join(cells) + " |")
        out += ["", f"Source before / after: the source task's {src_metric(self)} on its "
                f"{src['num_test']} test examples with its own head, after source "
                "fine-tuning and after the target fine-tuning (retention ratio = after / "
                "before). Probe before / after: a linear probe (logistic regression, or "
                f"ridge for regression) of the source task refitted on "
                f"{self.settings['transfer']['probe_examples']} source training examples "
                "over the frozen encoder, before and after the target fine-tuning: when "
                "the probe holds but the head's score drops, the old head no longer fits "
                "a representation that still carries the task."
                + (f" The same probe on the pre-trained encoder: {self.probe_base:.3f}."
                   if self.probe_base is not None else "")]
        out += ["", "## Per seed", "",
                "| distribution | seed | target | no intermediate | gain [95%] | ΔS | BWT | "
                "target s | baseline s |", "|---|---|---|---|---|---|---|---|---|"]
        n_test = int(tgt["num_test"])
        for r in self.runs:
            g = gain_verdict(m, r["target"], r["baseline"], n_test)["gain_interval"]
            out.append(f"| `{r['distribution']}` | {r['seed']} | {r['target']:.3f} | "
                       f"{r['baseline']:.3f} | {r['gain']:+.3f}{_interval(g, sign=True)} | "
                       f"{r['retention_delta']:+.3f} | "
                       f"{r['bwt']:+.3f} | {r['seconds']['target']:.0f} | "
                       f"{r['seconds']['baseline']:.0f} |")
        out += ["", "ΔS: source after minus before; BWT: backward transfer (Lopez-Paz & "
                "Ranzato 2017; for this two-task chain it equals ΔS). target s / baseline "
                "s: seconds of target fine-tuning with / without the intermediate step "
                "(the source fine-tuning not included)."]
        out += ["", "## Learning rates per layer group", "",
                "| group | " + " | ".join(f"`{d}`" for d in self.distributions) + " |",
                "|---|" + "---|" * len(self.distributions)]
        groups = next(iter(self.distributions.values()), {})
        for g in sorted(groups, key=_layer_position):
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


def src_metric(report: TransferReport) -> str:
    """The source task's primary metric (accuracy, or pearson for regression)."""
    return "pearson" if report.source.get("label_kind") == "regression" else "accuracy"


def _interval(interval: tuple[float, float] | None, *, sign: bool = False) -> str:
    if interval is None:
        return ""
    f = "+.3f" if sign else ".3f"
    return f" [{interval[0]:{f}}, {interval[1]:{f}}]"


def _cell(stat: dict[str, Any], interval: tuple[float, float] | None = None, *,
          sign: bool = False) -> str:
    """``mean ± std`` over seeds (just the value for one seed: there is no spread), then
    the 95% test-set interval when there is one."""
    text = f"{stat['mean']:{'+.3f' if sign else '.3f'}}"
    if stat["n"] > 1:
        text += f" ± {stat['std']:.3f}"
    return text + _interval(interval, sign=sign)


def _spread_note(report: TransferReport) -> str:
    seeds = len({r["seed"] for r in report.runs})
    spread = ("one seed, so no spread over seeds is shown" if seeds == 1 else
              f"mean ± std over {seeds} seeds")
    method = INTERVAL_METHOD.get(report.primary_metric)
    return (f"Numbers: {spread}; [low, high]: 95% interval from the "
            f"{report.target['num_test']} target test examples"
            + (f" ({method})" if method else "") + ".")


def _layer_position(group: str) -> tuple[int, int]:
    """Bottom-to-top order of layer groups (embeddings, layer.0, ..., the rest): JSON
    stores them sorted by name, which puts ``head`` before ``layer.0``."""
    if group == "embeddings":
        return (0, 0)
    if group.startswith("layer.") and group[6:].isdigit():
        return (1, int(group[6:]))
    return (2, 0)


def plot_report(report: TransferReport, out: Path) -> list[Path]:
    """The four report plots as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths: list[Path] = []
    colors = {d: plt.cm.tab10(i % 10) for i, d in enumerate(report.distributions)}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")  # keeps a legend below
        plt.close(fig)

    def legend_below(fig, ax) -> None:
        """One legend under the panels, where it covers no line."""
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(4, len(labels)), fontsize=8, frameon=False)

    def stages():
        """(distribution, stage, line style, label, that distribution's runs)."""
        for d in report.distributions:
            runs = [r for r in report.runs if r["distribution"] == d]
            for stage, style in (("transfer", "-"), ("baseline", ":")):
                yield d, stage, style, f"{d} ({stage})", runs

    def per_layer(ax, key: str, title: str, ylabel: str) -> None:
        for d, stage, style, label, runs in stages():
            values = [r[key][stage] for r in runs]
            names = sorted(values[0], key=_layer_position)
            ax.plot(names, [np.mean([v[n] for v in values]) for n in names], style,
                    marker="o", color=colors[d], label=label)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("layer group (bottom → top)")
        ax.tick_params(axis="x", rotation=45)
        # CKA sits near 1 and drift near 0: plain tick labels, never "1e-5+9.999e-1"
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for d, lrs in report.distributions.items():
        names = sorted(lrs, key=_layer_position)
        ax.plot(names, [lrs[n] for n in names], marker="o", label=d, color=colors[d])
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per layer group (bottom → top)")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    save(fig, "lr.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    per_layer(ax1, "drift", "Relative weight drift ‖θ−θ₀‖/‖θ₀‖",
              "relative drift (0 = unchanged)")
    per_layer(ax2, "cka", "Linear CKA with the pre-trained encoder",
              "linear CKA (1 = same representation)")
    low = min(float(np.nanmin(list(r["cka"][stage].values()))) for r in report.runs
              for stage in ("transfer", "baseline"))
    if np.isfinite(low):  # at least 0.01 of axis: a 1e-5 wobble must not fill the panel
        ax2.set_ylim(min(low, 0.99) - 0.005, 1.005)
    legend_below(fig, ax1)
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
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_title("Training loss (mean over seeds)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"target {report.primary_metric}")
    ax2.set_title(f"Target {report.primary_metric} per epoch (test sample)")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_below(fig, ax1)
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
