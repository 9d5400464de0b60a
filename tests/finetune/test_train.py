"""The training loop's checkpoints: a killed run resumes to the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stepstone.finetune.train as T
from stepstone.finetune.train import (
    FinetuneSettings,
    TaskModel,
    TrainingError,
    build_optimizer,
    finetune,
    metrics_from_outputs,
)
from tests.conftest import die_after_checkpoint

SETTINGS = FinetuneSettings(lr=1e-3, epochs=2, batch_size=4, warmup_ratio=0.2, seed=3)


def _model(tiny_encoder) -> TaskModel:
    torch.manual_seed(11)
    return TaskModel(tiny_encoder.copy(), 2)


def _killed_run(tiny_encoder, task, ckpt, monkeypatch, *, every: int, kill_after: int = 1,
                **kwargs) -> None:
    """A run that is killed right after its ``kill_after``-th checkpoint."""
    with monkeypatch.context() as m:
        die_after_checkpoint(m, write_number=kill_after)
        with pytest.raises(KeyboardInterrupt):
            finetune(_model(tiny_encoder), task.train, label_kind="classification",
                     progress=False, settings=SETTINGS, checkpoint_dir=ckpt,
                     checkpoint_every=every, **kwargs)
    assert (ckpt / T.CHECKPOINT_STATE).is_file()


@pytest.mark.parametrize("every,kill_after", [(3, 2), (8, 1)])  # mid-epoch; at an epoch end
def test_resume_gives_the_uninterrupted_weights(tiny_encoder, small_task, tmp_path, monkeypatch,
                                                every, kill_after):
    reference = _model(tiny_encoder)
    curve = []
    full = finetune(reference, small_task.train, label_kind="classification", progress=False,
                    settings=SETTINGS, on_epoch_end=lambda e, m: {"epoch": e})
    assert full.steps == 16 and full.epoch_metrics == [{"epoch": 0}, {"epoch": 1}]

    ckpt = tmp_path / "ckpt"
    _killed_run(tiny_encoder, small_task, ckpt, monkeypatch, every=every, kill_after=kill_after,
                on_epoch_end=lambda e, m: {"epoch": e})

    resumed_model = _model(tiny_encoder)  # a fresh process would rebuild the model this way
    resumed = finetune(resumed_model, small_task.train, label_kind="classification",
                       progress=False, settings=SETTINGS, checkpoint_dir=ckpt,
                       checkpoint_every=every,
                       on_epoch_end=lambda e, m: curve.append(e) or {"epoch": e})
    assert resumed.resumed_at == every * kill_after
    assert resumed.losses == pytest.approx(full.losses, abs=0)
    assert resumed.epoch_metrics == full.epoch_metrics
    # the epoch-end callback reruns only for epochs whose callback had not run when killed
    assert curve == list(range((every * kill_after - 1) // 8, 2))
    for (name, a), b in zip(reference.state_dict().items(), resumed_model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert not ckpt.exists()  # removed on success


def test_checkpoint_from_another_run_is_refused(tiny_encoder, small_task, tmp_path,
                                                monkeypatch):
    ckpt = tmp_path / "ckpt"
    _killed_run(tiny_encoder, small_task, ckpt, monkeypatch, every=2)
    other = FinetuneSettings(**{**SETTINGS.to_dict(), "lr": 5e-4})
    with pytest.raises(TrainingError, match="different run"):
        finetune(_model(tiny_encoder), small_task.train, label_kind="classification",
                 progress=False, settings=other, checkpoint_dir=ckpt)
    assert (ckpt / T.CHECKPOINT_STATE).is_file()  # nothing lost


def test_crash_between_the_renames_resumes_from_the_old_copy(tiny_encoder, small_task,
                                                            tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    _killed_run(tiny_encoder, small_task, ckpt, monkeypatch, every=5)
    ckpt.rename(tmp_path / "ckpt.old")  # state just before `tmp.rename(folder)`
    (tmp_path / "ckpt.tmp").mkdir()  # a half-written newer copy is ignored
    result = finetune(_model(tiny_encoder), small_task.train, label_kind="classification",
                      progress=False, settings=SETTINGS, checkpoint_dir=ckpt, checkpoint_every=5)
    assert result.resumed_at == 5 and result.steps == 16


def test_optimizer_state_round_trips(tiny_encoder, small_task):
    model = _model(tiny_encoder)
    finetune(model, small_task.train, label_kind="classification", progress=False,
             settings=FinetuneSettings(epochs=1, batch_size=8))
    opt, _ = build_optimizer(model, SETTINGS, None)
    loss = model(dict(model.encoder.tokenizer(["good movie"], return_tensors="pt"))).sum()
    loss.backward()
    opt.step()
    tensors, meta = T.optimizer_to_flat(opt)
    rebuilt = T.optimizer_from_flat(tensors, meta)
    original = opt.state_dict()
    assert rebuilt["param_groups"] == original["param_groups"]
    for i, state in original["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(rebuilt["state"][i][k]), torch.as_tensor(v))


def test_metrics_from_outputs():
    labels = np.array([0, 1, 1, 0])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 0.0]])
    m = metrics_from_outputs(logits, labels, "classification")
    assert m["accuracy"] == 0.75
    assert metrics_from_outputs(logits.argmax(1), labels, "classification") == m
    r = metrics_from_outputs(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]), "regression")
    assert r["mse"] == pytest.approx(1 / 3) and r["pearson"] > 0.95


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.2])
def test_schedule_is_the_linear_warmup_and_decay_step_by_step(tiny_encoder, warmup_ratio):
    """Learning rates equal, bit for bit, the formula the loop has always used; and why it
    is not transformers' get_linear_schedule_with_warmup: that one warms up a step later."""
    from transformers import get_linear_schedule_with_warmup

    total = 16
    settings = FinetuneSettings(lr=1e-3, warmup_ratio=warmup_ratio)
    warmup = int(total * warmup_ratio)
    want = [settings.lr * ((s + 1) / max(1, warmup) if s < warmup
                           else max(0.0, (total - s) / max(1, total - warmup)))
            for s in range(total)]

    def rates(opt, sched) -> list[list[float]]:
        out = []
        for _ in range(total):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        return out

    got = rates(*build_optimizer(_model(tiny_encoder), settings, total, "llrd:1e-3,1.0"))
    assert got == [[w] * len(got[0]) for w in want]  # exact, every group
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    hf = [r[0] for r in rates(opt, get_linear_schedule_with_warmup(opt, warmup, total))]
    if warmup == 0:
        assert hf == want
    else:
        assert hf[0] == 0.0 and hf[1:warmup + 1] == want[:warmup] and hf != want
