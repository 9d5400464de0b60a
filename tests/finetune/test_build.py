import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stepstone.esm.data import make_task, token_counts
from stepstone.esm.registry import Registry
from stepstone.finetune.build import BuildSettings, build_registry
from stepstone.finetune.train import FinetuneSettings, TaskModel, TrainingError, evaluate, finetune
from tests.conftest import make_texts

FAST = dict(max_examples=40, max_eval=20, finetune=FinetuneSettings(epochs=1, batch_size=8))


def _tasks(k=2):
    out = []
    for i in range(k):
        texts, labels = make_texts(50, seed=i)
        out.append(make_task(f"toy{i}", texts, labels))
    return out


def test_build_adds_skips_and_verifies(tmp_path, tiny_encoder):
    tasks = _tasks()
    report = build_registry(tmp_path, tasks, encoder=tiny_encoder,
                            settings=BuildSettings(**FAST), progress=False)
    assert len(report.added) == 2 and not report.failed
    reg = Registry(tmp_path)
    assert reg.verify().ok
    entry = reg.entries()[0]
    cfg = reg.config(entry.id)
    assert cfg.task_id == "toy0" and cfg.num_examples == 40
    assert cfg.encoder["fingerprint"] == tiny_encoder.fingerprint
    assert {"train_mse", "val_mse", "source_test_accuracy"} <= set(cfg.metrics)
    assert np.linalg.norm(entry.task_vector) == pytest.approx(1.0, abs=1e-5)
    assert reg.profile(entry.id)["token_counts"]
    again = build_registry(tmp_path, tasks, encoder=tiny_encoder,
                           settings=BuildSettings(**FAST), progress=False)
    assert again.added == [] and again.skipped == ["toy0", "toy1"]
    other = build_registry(tmp_path, tasks[:1], encoder=tiny_encoder, progress=False,
                           settings=BuildSettings(**{**FAST, "architecture": "lowrank",
                                                     "rank": 4}))
    assert len(other.added) == 1 and len(Registry(tmp_path)) == 3


def test_keep_models_and_failures_reported(tmp_path, tiny_encoder):
    report = build_registry(tmp_path, [*_tasks(1), str(tmp_path / "missing.csv")],
                            encoder=tiny_encoder, progress=False,
                            settings=BuildSettings(**FAST, keep_models=True))
    assert len(report.added) == 1
    assert "No such data file" in report.failed[str(tmp_path / "missing.csv")]
    reg = Registry(tmp_path)
    model_dir = reg.model_dir(report.added[0])
    assert (model_dir / "encoder" / "config.json").exists()
    assert (model_dir / "head.safetensors").exists()
    assert reg.verify().ok


def test_nan_loss_stops_with_message(tiny_encoder, small_task):
    model = TaskModel(tiny_encoder, 2)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="Loss became nan at step 1"):
        finetune(model, small_task.train, label_kind="classification", progress=False)


def test_finetune_learns_a_separable_task(tiny_encoder):
    texts, labels = make_texts(200, seed=3)
    task = make_task("toy", texts, labels)
    model = TaskModel(tiny_encoder, 2)
    before = evaluate(model, task)["accuracy"]
    finetune(model, task.train, label_kind="classification", progress=False,
             settings=FinetuneSettings(lr=1e-3, epochs=10, batch_size=16))
    after = evaluate(model, task)["accuracy"]
    assert after > 0.9 and after > before


def test_token_counts():
    counts = token_counts(["The movie was good, good!", "a good film"])
    assert counts == {"good": 3, "movie": 1, "film": 1}


KILL_BUILD = """
import os, sys
import stepstone.finetune.build as B
from stepstone.esm.encoder import load_encoder
from tests.finetune.test_build import FAST, _tasks
calls = []
real = B.finetune
def dying(*a, **k):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)
    return real(*a, **k)
B.finetune = dying
B.build_registry(sys.argv[2], _tasks(3), encoder=load_encoder(sys.argv[1], max_length=32),
                 settings=B.BuildSettings(**FAST), progress=False)
"""


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
def test_killed_build_resumes_without_loss(tmp_path, tiny_model_dir, tiny_encoder):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_BUILD))
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=str(tmp_path.parent),
                          env={**__import__("os").environ,
                               "PYTHONPATH": str(__import__("pathlib").Path(__file__)
                                                 .resolve().parents[2])})
    assert proc.returncode == 9, proc.stderr[-2000:]
    reg = Registry(tmp_path / "r", "w")  # opening for writing recovers
    assert reg.verify().ok and [e.task_id for e in reg.entries()] == ["toy0"]
    report = build_registry(reg, _tasks(3), encoder=tiny_encoder,
                            settings=BuildSettings(**FAST), progress=False)
    assert report.skipped == ["toy0"] and len(report.added) == 2
    assert reg.verify().ok


def test_a_map_worse_than_the_identity_fails_its_source_only(tmp_path, tiny_encoder):
    """The paper's fit from a random start, one epoch: worse than no map on the tiny
    model's small shift, so the build refuses that ESM; the closed-form fit records
    how much of the shift it captures."""
    from stepstone.esm.model import ESMFitSettings

    tasks = _tasks()
    paper = BuildSettings(**FAST, esm_fit=ESMFitSettings(method="adamw", epochs=1))
    report = build_registry(tmp_path, tasks[:1], encoder=tiny_encoder, settings=paper,
                            progress=False)
    assert not report.added and "worse than the identity map" in report.failed["toy0"]
    report = build_registry(tmp_path, tasks[:1], encoder=tiny_encoder,
                            settings=BuildSettings(**FAST), progress=False)
    reg = Registry(tmp_path)
    metrics = reg.config(report.added[0]).metrics
    assert metrics["val_mse"] <= metrics["identity_val_mse"]
    assert 0 <= metrics["shift_captured"] <= 1
