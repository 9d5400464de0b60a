"""Candidate filters: conditions on recorded metadata, include/exclude globs, and the
reasons they leave in ``rank`` and ``registry list``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stepstone.cli import main
from stepstone.esm.errors import ConfigError
from stepstone.esm.filters import CandidateFilter, filter_entries
from stepstone.esm.model import ESMConfig, ESMFitSettings, fit_esm
from stepstone.esm.registry import Registry

# task id, num_examples, label kind, fit method
SOURCES = [("movie_review", 300, "classification", "ridge"),
           ("amazon_review", 900, "classification", "adamw"),
           ("sms_spam", 1200, "classification", "ridge"),
           ("stsb", 700, "regression", "ridge")]


@pytest.fixture()
def registry(tmp_path, tiny_encoder):
    reg = Registry(tmp_path / "reg", "w", create=True)
    ident = tiny_encoder.identity
    rng = np.random.default_rng(0)
    for i, (task, n, kind, method) in enumerate(SOURCES):
        X = rng.normal(size=(40, ident.dim)).astype(np.float32)
        cfg = ESMConfig(encoder=dataclasses.asdict(ident), task_id=task, num_examples=n,
                        label_kind=kind, classes=[] if kind == "regression" else ["a", "b"])
        esm = fit_esm(X, 2 * X + 1, config=cfg,
                      settings=ESMFitSettings(method=method, epochs=1))[0]
        reg.add(esm, esm_id=f"{task}-{i}", settings_key=str(i))
    return reg


def _ids(reg, **kw):
    return [e.task_id for e in filter_entries(reg, reg.entries(), CandidateFilter(**kw)).kept]


def test_conditions_on_columns_and_recorded_config(registry):
    assert _ids(registry, where=("num_examples>=700",)) == ["amazon_review", "sms_spam", "stsb"]
    assert _ids(registry, where=("task~REVIEW",)) == ["amazon_review", "movie_review"]
    assert _ids(registry, where=("task!~review", "label_kind=classification")) == ["sms_spam"]
    # an adamw fit records no 'method' (its keys predate it): absent fails the condition
    assert _ids(registry, where=("fit.method=ridge",)) == ["movie_review", "sms_spam", "stsb"]
    assert _ids(registry, where=("fit.epochs=1",)) == ["amazon_review"]
    assert _ids(registry, where=("examples<1000", "examples>300")) == ["amazon_review", "stsb"]
    assert _ids(registry, where=("finetune.epochs>1",)) == []  # absent field: filtered out
    assert _ids(registry, include=("*review",), exclude=("movie*",)) == ["amazon_review"]
    assert _ids(registry, include=("sms_spam-2",)) == ["sms_spam"]  # by ESM id too


def test_reasons_name_the_rule_and_value(registry):
    result = filter_entries(registry, registry.entries(), CandidateFilter(
        where=("num_examples>=500",), exclude=("stsb",)))
    assert result.filtered == {
        "movie_review-0": "filtered out: --where 'num_examples>=500' (num_examples is 300)",
        "stsb-3": "filtered out: --exclude 'stsb'"}
    assert result.summary() == ("2 candidate(s) filtered out: 1 by --where 'num_examples>=500'"
                                "; 1 by --exclude 'stsb'")


@pytest.mark.parametrize("bad, match", [
    ("num_examples", "FIELD OP VALUE"), ("num_examples>=", "FIELD OP VALUE"),
    ("colour=red", "Unknown filter field 'colour'"), ("task~(", "not a regular expression")])
def test_bad_conditions_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        CandidateFilter(where=(bad,))
    with pytest.raises(ConfigError, match="sequence of strings"):
        CandidateFilter(where="task~x")


def test_rank_records_filtered_candidates(registry, tiny_encoder):
    from stepstone.esm.data import make_task
    from stepstone.selection.ranking import rank
    from tests.conftest import make_texts

    task = make_task("tgt", *make_texts(40, seed=3))
    ranking = rank(task, registry, encoder=tiny_encoder, cache=False, progress=False,
                   gain=False, check_leakage=False,
                   filters=CandidateFilter(where=("task~review",), exclude=("amazon*",)))
    assert ranking.task_ids == ["movie_review"]
    assert ranking.skipped["sms_spam-2"].startswith("filtered out: --where 'task~review'")
    assert ranking.skipped["amazon_review-1"] == "filtered out: --exclude 'amazon*'"
    assert ranking.settings["filtered_out"] == {"filtered out: --where 'task~review'": 2,
                                                "filtered out: --exclude 'amazon*'": 1}
    assert ranking.settings["filters"]["exclude"] == ["amazon*"]
    with pytest.raises(ConfigError, match="must be a CandidateFilter"):
        rank(task, registry, encoder=tiny_encoder, filters={"where": ["task~review"]})


def test_cli_registry_list_filters(registry, capsys):
    args = ["registry", "list", "--registry", str(registry.path), "--where", "num_examples>=800",
            "--exclude", "stsb"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["task_id"] for e in out["esms"]] == ["amazon_review", "sms_spam"]
    assert set(out["filtered_out"]) == {"movie_review-0", "stsb-3"}
    assert main(args) == 0
    assert "2 candidate(s) filtered out" in capsys.readouterr().out
    assert main(["registry", "list", "--registry", str(registry.path), "--where", "x"]) == 2
    assert "FIELD OP VALUE" in capsys.readouterr().err


def test_cli_rank_filters_and_says_how_many(registry, tmp_path, tiny_model_dir, capsys):
    import pandas as pd

    from tests.conftest import make_texts

    texts, labels = make_texts(30, seed=5)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "t.csv", index=False)
    args = ["rank", str(tmp_path / "t.csv"), "--registry", str(registry.path), "--encoder",
            str(tiny_model_dir), "--max-length", "32", "--no-cache", "--quiet",
            "--no-leakage-check", "--where", "num_examples>=800", "--exclude", "sms*"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "amazon_review" in out and "movie_review" not in out.split("not ranked")[0]
    assert ("3 candidate(s) filtered out: 2 --where 'num_examples>=800'; 1 --exclude 'sms*'"
            in out)
