"""The transfer pipeline end to end on a tiny random BERT: report, resume, search."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stepstone.finetune.transfer as TR
from stepstone.esm.data import DataError
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.train import FinetuneSettings
from stepstone.finetune.transfer import LRSearchSettings, TransferSettings, transfer
from stepstone.finetune.transfer_report import TransferReport
from tests.conftest import die_after_checkpoint, write_task_csv

SETTINGS = TransferSettings(
    seeds=2, source_max_examples=40, target_max_examples=24, max_eval=16, probe_examples=24,
    cka_examples=8, curve_examples=8, checkpoint_every=2,
    finetune=FinetuneSettings(lr=1e-3, epochs=2, batch_size=8))
SPECS = ["flat:1e-3", "llrd:1e-3,0.5"]


_csv = write_task_csv


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Two source files in a tiny registry (one with its model kept) and a target file."""
    from stepstone.esm.encoder import load_encoder

    root = tmp_path_factory.mktemp("transfer")
    encoder = load_encoder(str(tiny_model_dir), max_length=32)
    sources = [_csv(root / f"src{i}.csv", 60, seed=10 + i) for i in range(2)]
    fast = dict(max_examples=40, max_eval=16, finetune=FinetuneSettings(epochs=1, batch_size=8))
    build_registry(root / "reg", sources[:1], encoder=encoder, progress=False,
                   settings=BuildSettings(**fast))
    build_registry(root / "reg", sources[1:], encoder=encoder, progress=False,
                   settings=BuildSettings(**fast, keep_models=True))
    return {"root": root, "encoder": encoder, "registry": root / "reg",
            "target": _csv(root / "target.csv", 50, seed=99), "sources": sources}


def _run(world, out, **kw):
    options = dict(registry=world["registry"], encoder=world["encoder"],
                   lr_distributions=SPECS, settings=SETTINGS, out=out, progress=False)
    source = kw.pop("source", world["sources"][0])
    options.update(kw)
    return transfer(world["target"], source, **options)


def _count_finetunes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = TR.finetune

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(TR, "finetune", counting)
    return calls


def _numbers(report: TransferReport) -> list[tuple]:
    return [(r["distribution"], r["seed"], r["target"], r["baseline"], r["source_after"],
             r["probe_after"]) for r in report.runs]


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_report_contents(world, tmp_path, monkeypatch):
    calls = _count_finetunes(monkeypatch)
    out = tmp_path / "out"
    report = _run(world, out)
    # per seed: 1 source + 2 distributions x (transfer + baseline)
    assert len(calls) == 2 * (1 + 2 * 2)
    assert len(report.runs) == 4 and report.primary_metric == "accuracy"
    assert report.source["task_id"] == "src0" and report.source["source_model"] == "fine-tuned"
    for r in report.runs:
        assert r["gain"] == pytest.approx(r["target"] - r["baseline"])
        assert r["retention_delta"] == pytest.approx(r["source_after"] - r["source_before"])
        assert r["retention_ratio"] == pytest.approx(r["source_after"] / r["source_before"])
        assert r["bwt"] == pytest.approx(r["retention_delta"])  # a two-task chain
        # head = the pooler here (the fresh task head has no pre-trained counterpart)
        assert set(r["drift"]["transfer"]) == {"embeddings", "layer.0", "layer.1", "head"}
        assert set(r["cka"]["baseline"]) == {"embeddings", "layer.0", "layer.1"}
        assert all(0 <= v <= 1 + 1e-9 for v in r["cka"]["transfer"].values())
        assert len(r["curves"]["transfer_loss"]) == 2 * 3  # 24 examples, batch 8, 2 epochs
        assert len(r["curves"]["baseline_epoch_metric"]) == 2
    # the same source model serves both distributions of a seed
    s0 = [r for r in report.runs if r["seed"] == 0]
    assert s0[0]["source_before"] == s0[1]["source_before"]
    # baselines do not depend on the source, but do on the distribution
    llrd = report.distributions["llrd:1e-3,0.5"]
    assert llrd["head"] == pytest.approx(1e-3) and llrd["layer.1"] == pytest.approx(5e-4)
    for name in ("report.json", "report.md", "lr.png", "drift.png", "curves.png",
                 "retention_gain.png"):
        assert (out / name).is_file(), name
    loaded = TransferReport.load(out)
    assert _numbers(loaded) == _numbers(report)
    summary = report.summary_dict()["flat:1e-3"]["gain"]
    gains = [r["gain"] for r in report.runs if r["distribution"] == "flat:1e-3"]
    assert summary["mean"] == pytest.approx(np.mean(gains))
    assert summary["std"] == pytest.approx(np.std(gains, ddof=1))
    md = (out / "report.md").read_text()
    assert "src0 → target" in md and "| `llrd:1e-3,0.5` |" in md
    assert not (out / "checkpoints" / "seed0" / "source-model").exists()  # not kept

    # a rerun with the same arguments trains nothing and gives the same report
    calls.clear()
    again = _run(world, out)
    assert calls == [] and _numbers(again) == _numbers(report)


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_killed_run_resumes_to_the_same_numbers(world, tmp_path, monkeypatch):
    reference = _run(world, tmp_path / "ref", lr_distributions=SPECS[:1])
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # killed mid-way through seed 0's baseline
        die_after_checkpoint(m, when=lambda folder: "baseline" in str(folder))
        with pytest.raises(KeyboardInterrupt):
            _run(world, out, lr_distributions=SPECS[:1])
    assert (out / "runs" / "seed0" / "source.json").is_file()
    assert (out / "runs" / "seed0" / "flat_1e-3-transfer.json").is_file()
    assert not (out / "runs" / "seed0" / "flat_1e-3-baseline.json").exists()

    calls = _count_finetunes(monkeypatch)
    resumed = _run(world, out, lr_distributions=SPECS[:1])
    # seed 0: only the baseline (resumed from its checkpoint); seed 1: all three stages
    assert calls == ["baseline flat_1e-3 s0", "source src0 s1", "transfer flat_1e-3 s1",
                     "baseline flat_1e-3 s1"]
    assert _numbers(resumed) == _numbers(reference)


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_other_settings_in_the_same_folder_are_refused(world, tmp_path):
    out = tmp_path / "out"
    one_seed = TransferSettings(**{**SETTINGS.to_dict(), "seeds": 1,
                                   "finetune": SETTINGS.finetune})
    _run(world, out, lr_distributions=SPECS[:1], settings=one_seed)
    with pytest.raises(DataError, match="other settings.*distributions"):
        _run(world, out, lr_distributions=SPECS[1:], settings=one_seed)
    assert (out / "runs" / "seed0" / "flat_1e-3-transfer.json").is_file()  # nothing lost
    report = _run(world, out, lr_distributions=SPECS[1:], settings=one_seed, overwrite=True)
    assert [r["distribution"] for r in report.runs] == SPECS[1:]


def test_bad_input_fails_before_training(world, tmp_path, monkeypatch):
    calls = _count_finetunes(monkeypatch)
    with pytest.raises(ValueError, match="LR distribution must be"):
        _run(world, tmp_path / "a", lr_distributions=["layerwise:3"])
    with pytest.raises(ValueError, match="matches no layer group"):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({"layer\\.[0-9]+": 1e-4, "decoder": 1e-3}))
        _run(world, tmp_path / "b", lr_distributions=[str(path)])
    with pytest.raises(DataError, match="same task"):
        _run(world, tmp_path / "c", source=world["target"])
    assert calls == [] and not (tmp_path / "a").exists()


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_auto_source_and_kept_model(world, tmp_path, monkeypatch):
    from stepstone.selection.ranking import rank

    calls = _count_finetunes(monkeypatch)
    settings = TransferSettings(**{**SETTINGS.to_dict(), "seeds": 1,
                                   "finetune": SETTINGS.finetune})
    report = _run(world, tmp_path / "out", source="auto", lr_distributions=SPECS[:1],
                  settings=settings)
    expected = rank(world["target"], world["registry"], encoder=world["encoder"],
                    progress=False, cache=False)
    assert report.source["selected_by"] == "auto"
    assert report.source["esm_id"] == expected.rows[0].esm_id
    assert [r["esm_id"] for r in report.source["ranking"]] == [r.esm_id for r in expected.rows]
    if report.source["task_id"] == "src1":  # the kept model is reused, not retrained
        assert report.source["source_model"] == "registry"
        assert not any(c.startswith("source") for c in calls)
    # naming the kept source explicitly always reuses it
    calls.clear()
    kept = _run(world, tmp_path / "kept", source="src1", lr_distributions=SPECS[:1],
                settings=settings)
    assert kept.source["source_model"] == "registry"
    assert calls == ["transfer flat_1e-3 s0", "baseline flat_1e-3 s0"]


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_lr_search_writes_a_reusable_distribution_and_resumes(world, tmp_path):
    out = tmp_path / "out"
    settings = TransferSettings(**{**SETTINGS.to_dict(), "seeds": 1,
                                   "finetune": SETTINGS.finetune})
    search = LRSearchSettings(trials=3, validation_ratio=0.25)
    report = _run(world, out, lr_distributions=["search"], settings=settings, search=search)
    best = out / "lr_search" / "best_distribution.json"
    mapping = json.loads(best.read_text())
    assert set(mapping) == {"embeddings", "layer.0", "layer.1", "head"}
    assert all(1e-6 <= v <= 2e-3 for v in mapping.values())
    assert list(report.distributions) == [str(best)]
    assert report.distributions[str(best)] == pytest.approx(mapping)
    trials = json.loads((out / "lr_search" / "trials.json").read_text())
    assert len(trials) == 3
    # more trials on the same folder: only the missing one runs
    more = LRSearchSettings(trials=4, validation_ratio=0.25)
    TR.search_distribution(TR.TransferRun(
        out, target=_target(world, settings), source=TR.choose_source(
            _target(world, settings), world["sources"][0], _registry(world),
            encoder=world["encoder"]),
        encoder=world["encoder"], settings=settings, distributions=["search"],
        progress=False), more, out / "lr_search")
    assert len(json.loads((out / "lr_search" / "trials.json").read_text())) == 4
    # the written file is a valid --lr-distribution
    again = _run(world, tmp_path / "reuse", lr_distributions=[str(best)], settings=settings)
    assert again.runs[0]["distribution"] == str(best)


def _target(world, settings):
    from stepstone.esm.specs import load_task

    return load_task(world["target"]).subsample(max_train=settings.target_max_examples,
                                                max_test=settings.max_eval, seed=0)


def _registry(world):
    from stepstone.esm.registry import Registry

    return Registry(world["registry"])


def test_cli_transfer_json(world, tmp_path, tiny_model_dir, capsys):
    from stepstone.cli import main

    rc = main(["transfer", world["target"], "--source", world["sources"][0], "--registry",
               str(world["registry"]), "--encoder", str(tiny_model_dir), "--out",
               str(tmp_path / "out"), "--seeds", "1", "--source-max-examples", "40",
               "--target-max-examples", "24", "--max-eval", "16", "--probe-examples", "24",
               "--cka-examples", "8", "--curve-examples", "8", "--ft-epochs", "1",
               "--ft-batch-size", "8", "--lr-distribution", "flat:1e-3", "kenneweg",
               "--no-plots", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["distribution"] for r in data["runs"]] == ["flat:1e-3", "kenneweg"]
    assert data["settings"]["transfer"]["finetune"]["epochs"] == 1
    assert not (tmp_path / "out" / "lr.png").exists()
    rc = main(["transfer", world["target"], "--registry", str(world["registry"]),
               "--encoder", str(tiny_model_dir), "--out", str(tmp_path / "o2"),
               "--lr-distribution", "llrd:1e-3"])
    assert rc == 2 and "LR distribution must be" in capsys.readouterr().err


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_stabilised_transfer(world, tmp_path, tiny_model_dir, capsys):
    from stepstone.cli import main
    from stepstone.finetune.stabilize import StabilizerSettings

    settings = TransferSettings(**{**SETTINGS.to_dict(), "seeds": 1,
                                   "finetune": SETTINGS.finetune})
    report = _run(world, tmp_path / "ens", lr_distributions=SPECS[:1], settings=settings,
                  stabilizer=StabilizerSettings(kind="ensemble", members=3))
    run = report.runs[0]
    assert run["model_steps"] == {"target": 3 * 6, "baseline": 3 * 6}  # 3 members x 6 steps
    assert report.settings["stabilizer"]["kind"] == "ensemble"
    assert "stabiliser: ensemble (3 members)" in (tmp_path / "ens" / "report.md").read_text()
    # the stabiliser is part of the run's identity: the same folder refuses another one
    with pytest.raises(DataError, match="stabilizer"):
        _run(world, tmp_path / "ens", lr_distributions=SPECS[:1], settings=settings)

    rc = main(["transfer", world["target"], "--source", world["sources"][0], "--registry",
               str(world["registry"]), "--encoder", str(tiny_model_dir), "--out",
               str(tmp_path / "deni"), "--seeds", "1", "--source-max-examples", "40",
               "--target-max-examples", "24", "--max-eval", "16", "--probe-examples", "24",
               "--cka-examples", "8", "--curve-examples", "8", "--ft-epochs", "4",
               "--ft-batch-size", "8", "--lr-distribution", "flat:1e-3", "--stabilizer", "deni",
               "--stab-members", "2", "--stab-interpolation-interval", "2", "--no-plots",
               "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    stage = json.loads((tmp_path / "deni" / "runs" / "seed0" / "flat_1e-3-transfer.json")
                       .read_text())
    assert stage["stabilizer"]["kind"] == "deni" and stage["stabilizer"]["members"] == 2
    assert data["runs"][0]["model_steps"]["target"] == stage["stabilizer"]["model_steps"] > 12
