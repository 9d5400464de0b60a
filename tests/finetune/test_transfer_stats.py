"""The transfer report a person can act on (issue 18, part B): intervals and a verdict
for the gain, no fake spread from one seed, degenerate-model warnings, NaN refused with
the cap named, explained columns, labelled plots, and the LR search's validation split."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from stepstone.esm.data import DataError, make_task
from stepstone.finetune.train import FinetuneSettings
from stepstone.finetune.transfer import TransferSettings, _check_finite, _validation_split, transfer
from stepstone.finetune.transfer_report import TransferReport
from stepstone.finetune.transfer_stats import (
    degenerate,
    difference_interval,
    fisher_interval,
    gain_verdict,
    prediction_profile,
    wilson_interval,
)
from tests.conftest import make_texts, tiny_transfer_world

SETTINGS = TransferSettings(
    seeds=1, source_max_examples=40, target_max_examples=24, max_eval=16, probe_examples=24,
    cka_examples=8, curve_examples=8, finetune=FinetuneSettings(lr=1e-3, epochs=2, batch_size=8))


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory, tiny_model_dir):
    """A real one-seed transfer on the tiny model (the source fine-tuned here)."""
    root = tmp_path_factory.mktemp("transfer-stats")
    encoder, source, target = tiny_transfer_world(root, tiny_model_dir)
    report = transfer(target, source, registry=root / "reg", encoder=encoder,
                      lr_distributions=["flat:1e-3"], settings=SETTINGS, out=root / "out",
                      progress=False)
    return report, root / "out"


# -- intervals against published values and a brute-force definition -----------------------
def test_wilson_interval_matches_newcombe_1998_and_its_definition():
    # Newcombe (1998a, Stat. Med. 17:857), example 81/263: 0.2553 to 0.3662
    low, high = wilson_interval(81 / 263, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    # by definition: the p0 whose score test |p - p0| / sqrt(p0 (1 - p0) / n) equals z
    p, n, z = 2 / 70, 70, 1.959963984540054
    grid = np.linspace(1e-6, 1 - 1e-6, 2_000_001)
    inside = grid[np.abs(p - grid) <= z * np.sqrt(grid * (1 - grid) / n)]
    np.testing.assert_allclose(wilson_interval(p, n), (inside[0], inside[-1]), atol=1e-6)
    assert wilson_interval(0.0, 10)[0] == 0.0
    assert wilson_interval(1.0, 10)[1] == pytest.approx(1.0)


def test_gain_interval_is_newcombes_method_10():
    # Newcombe (1998b, Stat. Med. 17:873), 56/70 - 48/80, method 10: +0.0524 to +0.3339
    a, b = 56 / 70, 48 / 80
    low, high = difference_interval(a, wilson_interval(a, 70), b, wilson_interval(b, 80))
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_fisher_interval_contains_r_and_narrows_with_n():
    lo1, hi1 = fisher_interval(0.5, 20)
    lo2, hi2 = fisher_interval(0.5, 200)
    assert lo1 < lo2 < 0.5 < hi2 < hi1
    assert math.tanh(math.atanh(0.5) + 1.959963984540054 / math.sqrt(17)) == pytest.approx(hi1)


@pytest.mark.parametrize(("target", "baseline", "n", "verdict"), [
    (0.90, 0.60, 200, "helped"), (0.60, 0.90, 200, "hurt"),
    (0.629, 0.600, 70, "no measurable effect")])  # the issue's +0.029 on 70 examples
def test_verdict_sentence(target, baseline, n, verdict):
    v = gain_verdict("accuracy", target, baseline, n)
    assert v["verdict"] == verdict
    low, high = v["gain_interval"]
    assert low < target - baseline < high
    assert f"{low:+.3f} to {high:+.3f} on {n} test examples" in v["sentence"]
    if verdict == "no measurable effect":
        assert "(about 2 of 70 examples)" in v["sentence"] and low < 0 < high


# -- the report --------------------------------------------------------------------------
def test_one_seed_report_shows_no_spread_and_an_interval(one_seed):
    report, out = one_seed
    text, md = str(report), (out / "report.md").read_text()
    assert "±" not in text and "± 0.000" not in md
    assert "one seed, so no spread over seeds is shown" in text
    v = report.verdicts()["flat:1e-3"]
    n = report.target["num_test"]
    low, high = v["gain_interval"]
    assert v["target_interval"] == pytest.approx(wilson_interval(report.runs[0]["target"], n))
    assert f"gain {report.runs[0]['gain']:+.3f} [{low:+.3f}, {high:+.3f}]" in text
    assert v["sentence"] in text and f"- `flat:1e-3`: {v['sentence']}" in md
    assert report.summary_dict()["flat:1e-3"]["gain"]["std"] is None
    assert TransferReport.load(out).to_dict()["verdicts"]["flat:1e-3"]["verdict"] == v["verdict"]


def test_report_explains_probe_rows_and_seconds_columns(one_seed):
    _, out = one_seed
    md = (out / "report.md").read_text()
    assert "Probe before / after: a linear probe" in md
    assert "target s / baseline s: seconds of target fine-tuning with / without the " \
           "intermediate step" in md


def test_several_seeds_show_mean_and_std(one_seed):
    report, _ = one_seed
    runs = [report.runs[0], {**copy.deepcopy(report.runs[0]), "seed": 1, "target": 0.1}]
    runs[1]["gain"] = runs[1]["target"] - runs[1]["baseline"]
    two = TransferReport(report.target, report.source, report.settings,
                         report.distributions, runs, report.primary_metric, report.probe_base)
    std = np.std([r["gain"] for r in runs], ddof=1)
    assert f"± {std:.3f}" in str(two) and "mean ± std over" in two.to_markdown()


def test_degenerate_models_are_warned_about(one_seed):
    labels = np.array([0, 0, 0, 1, 1, 2])
    constant = prediction_profile(np.zeros((6, 3)) + [0, 1, 0], labels, "classification")
    assert constant["distinct"] == 1 and constant["majority_share"] == 0.5
    assert degenerate(constant, 2 / 6, ["a", "b", "c"]) == \
        "predicts one class ('b') for every test example"
    varied = prediction_profile(np.array([0, 1, 1, 1, 2, 2]), labels, "classification")
    assert "no better than always predicting the most common class (0.500" in \
        degenerate(varied, 0.5, None)
    assert degenerate(varied, 0.51, None) is None
    assert degenerate(prediction_profile(np.ones(5), np.arange(5.0), "regression"), 0.0) == \
        "predicts the same value for every test example"

    report, _ = one_seed
    run = copy.deepcopy(report.runs[0])
    assert set(run["predictions"]) == {"source", "transfer", "baseline"}
    assert run["predictions"]["transfer"]["n"] == report.target["num_test"]
    run["predictions"]["baseline"] = {**run["predictions"]["baseline"], "distinct": 1,
                                      "top_class": 0}
    bad = TransferReport(report.target, report.source, report.settings,
                         report.distributions, [run], report.primary_metric)
    cls = report.target["classes"][0]
    warning = (f"The target model fine-tuned without the intermediate step (`flat:1e-3`, "
               f"seed 0) predicts one class ({cls!r}) for every test example.")
    assert warning in bad.warnings() and f"WARNING: {warning}" in str(bad)
    assert f"**Warning**: {warning}" in bad.to_markdown()


def test_nan_retention_is_an_error_naming_the_cap(one_seed):
    report, _ = one_seed
    run = {**copy.deepcopy(report.runs[0]), "source_before": 0.0,
           "retention_ratio": float("nan")}
    with pytest.raises(DataError, match=r"retention_ratio is NaN for flat:1e-3 seed 0: the "
                       r"source model scored 0 on its 12 test examples.*--max-eval 16"):
        _check_finite([run], SETTINGS, 12, 10)
    _check_finite(report.runs, SETTINGS, 12, 10)  # finite: nothing to say


# -- plots --------------------------------------------------------------------------------
def test_drift_and_curves_plots_are_labelled(one_seed, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    report, _ = one_seed
    run = copy.deepcopy(report.runs[0])
    for stage in ("transfer", "baseline"):  # CKA a hair below 1: the offset-label trap
        run["cka"][stage] = {k: 1 - 1e-5 * (i + 1) for i, k in
                             enumerate(run["cka"][stage])}
    near_one = TransferReport(report.target, report.source, report.settings,
                              report.distributions, [run], report.primary_metric)
    saved, real = {}, Figure.savefig

    def spy(self, path, *args, **kwargs):
        saved[str(path).rsplit("/", 1)[-1]] = self
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    near_one.save(tmp_path)
    drift, cka = saved["drift.png"].axes[:2]
    assert drift.get_ylabel() and cka.get_ylabel() == "linear CKA (1 = same representation)"
    saved["drift.png"].canvas.draw()
    assert cka.yaxis.get_offset_text().get_text() == ""  # no "1e-5+9.999e-1"
    low, high = cka.get_ylim()
    assert high - low >= 0.01
    assert [t.get_text() for t in drift.get_xticklabels()][0] == "embeddings"
    loss, acc = saved["curves.png"].axes[:2]
    assert loss.get_ylabel() and acc.get_ylabel() == "target accuracy"


# -- the LR search's validation split ------------------------------------------------------
def test_validation_split_stratifies_and_keeps_a_tiny_class_in_training():
    texts, labels = make_texts(40)
    labels = labels[:37] + ["rare", "rare", "pos"]
    task = make_task("tiny_class", texts, labels, seed=0)
    train, val = _validation_split(task, 0.25, 3)
    assert len(train) + len(val) == len(task.train)
    assert not set(train.texts) & set(val.texts)
    for k in range(len(task.classes)):
        m = int(np.sum(task.train.labels == k))
        held = int(np.sum(val.labels == k))
        if m >= 2:  # a share of every class, rows on both sides
            assert held == min(max(round(m * 0.25), 1), m - 1)
        else:  # a one-row class cannot be on both sides: it stays in training
            assert held == 0
    again, _ = _validation_split(task, 0.25, 3)
    assert again.texts == train.texts  # seeded
