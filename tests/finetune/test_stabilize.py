"""Stabilisers: the DENI schedule and noise, exact averaging and voting, cost accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stepstone.finetune.stabilize as S
import stepstone.finetune.train as T
from stepstone.finetune.stabilize import (
    DeniEvent,
    StabilizedModel,
    StabilizerSettings,
    add_noise,
    average_into,
    combine_labels,
    combine_outputs,
    deni_schedule,
    noise_parameter_names,
    noise_scale,
    train_stabilized,
)
from stepstone.finetune.train import FinetuneSettings, TaskModel, finetune
from tests.conftest import die_after_checkpoint

SETTINGS = FinetuneSettings(lr=1e-3, epochs=3, batch_size=4, warmup_ratio=0.1, seed=5)
# 32 training examples, batch 4: 8 steps per epoch, N = 24. With interval 3 the DENI
# window [ceil(7.2), ceil(14.4)) = [8, 15) holds rounds at 8 and 11; the ensemble runs
# the last 24 - ceil(21.6) = 2 steps.
DENI = dict(kind="deni", members=3, interpolation_interval=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared, busy CPU
    their spin-waits make its steps 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(tiny_encoder, seed: int = 11) -> TaskModel:
    torch.manual_seed(seed)
    return TaskModel(tiny_encoder.copy(), 2)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- schedule -------------------------------------------------------------------------------
def test_deni_schedule_with_the_issue_defaults():
    sched = deni_schedule(1000)
    assert [(e.kind, e.start, e.steps) for e in sched.events] == [
        ("interpolate", 300, 125), ("interpolate", 425, 125), ("ensemble", 900, 100)]
    # 550 + 125 would run past the window's end at 600: no partial round
    first = sched.interpolations[0]
    assert first.first_step == 301 and first.end == 425
    assert first.noise == pytest.approx(math.sqrt(0.15 / 301), rel=1e-12)
    assert sched.interpolations[1].noise == pytest.approx(math.sqrt(0.15 / 426), rel=1e-12)
    assert sched.ensemble.noise == pytest.approx(math.sqrt(0.15), rel=1e-12)
    assert sched.copy_steps == 350 and sched.model_steps(10) == 1000 + 9 * 350
    assert sched.warnings == ()


def test_deni_schedule_small_n_and_custom_options():
    tight = deni_schedule(100)  # window [30, 60) is shorter than 125 steps
    assert tight.interpolations == [] and len(tight.warnings) == 1
    assert "no noisy-interpolation round fits" in tight.warnings[0]
    assert tight.ensemble == DeniEvent("ensemble", 90, 10, math.sqrt(0.15))

    s = StabilizerSettings(kind="deni", interpolation_interval=10, interpolation_start=0.2,
                           interpolation_end=0.5, ensemble_start=0.8, ensemble_noise=0.04)
    sched = deni_schedule(100, s)
    assert [e.start for e in sched.interpolations] == [20, 30, 40]  # 40 + 10 = 50 fits
    assert sched.ensemble == DeniEvent("ensemble", 80, 20, 0.2)
    # 0.3 * 10 is 3.0000000000000004 in floating point; the window still starts at 3
    assert deni_schedule(10, StabilizerSettings(interpolation_interval=1)).interpolations[0] \
        .start == 3
    single = deni_schedule(1)
    assert single.events == () and len(single.warnings) == 2


def test_noise_scale_is_at_the_one_based_step():
    assert noise_scale(1) == pytest.approx(math.sqrt(0.15))
    assert noise_scale(301, StabilizerSettings(interpolation_noise=0.6)) == \
        pytest.approx(math.sqrt(0.6 / 301))
    with pytest.raises(ValueError, match="1-based"):
        noise_scale(0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="denni"), "'kind' must be one of"),
    (dict(kind="deni", members=1), "'members' must be >= 2"),
    (dict(interpolation_start=0.7), "interpolation_start <= interpolation_end"),
    (dict(interpolation_interval=0), "'interpolation_interval'"),
    (dict(vote="soft"), "'vote' must be one of"),
    (dict(noise_scope="encoder"), "'noise_scope' must be one of"),
    (dict(swa_lr_scale=0), "'swa_lr_scale'"),
])
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StabilizerSettings(**kwargs)


def test_every_setting_has_help_and_makes_a_cli_option():
    import argparse
    import dataclasses

    from stepstone.cli import add_config_args, config_from_args

    for f in dataclasses.fields(StabilizerSettings):
        assert f.metadata.get("help"), f.name
    parser = argparse.ArgumentParser()
    add_config_args(parser, StabilizerSettings)
    args = parser.parse_args(["--kind", "deni", "--members", "4", "--interpolation-noise",
                              "0.2", "--noise-scope", "all"])
    assert config_from_args(StabilizerSettings, args) == StabilizerSettings(
        kind="deni", members=4, interpolation_noise=0.2, noise_scope="all")


# -- noise ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["head", "all"])
def test_noise_lands_in_scope_with_per_tensor_std(tiny_encoder, scope):
    model = _model(tiny_encoder)
    before = _weights(model)
    names = noise_parameter_names(model, scope)
    head = {"head.weight", "head.bias", "backbone.pooler.dense.weight",
            "backbone.pooler.dense.bias"}
    if scope == "head":
        assert set(names) == head
    else:
        assert set(names) == {n for n, _ in model.named_parameters()}
    eps = add_noise(model, 0.3, names=names, generator=torch.Generator().manual_seed(0))
    assert set(eps) == set(names)
    for name, p in model.named_parameters():
        delta = p.detach() - before[name]
        if name in names:
            std = before[name].std(correction=0)
            torch.testing.assert_close(delta, 0.3 * std * eps[name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name


def test_noise_statistics_on_a_large_tensor():
    layer = torch.nn.Linear(400, 500)
    with torch.no_grad():
        layer.weight.normal_(0.0, 2.0)
    before = layer.weight.detach().clone()
    add_noise(layer, 0.5, names=["weight"], generator=torch.Generator().manual_seed(1))
    delta = layer.weight.detach() - before
    assert float(delta.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(delta.std()) == pytest.approx(0.5 * float(before.std(correction=0)), rel=0.01)


def test_auto_scope_is_all_trainable_when_some_are_frozen(tiny_encoder):
    model = _model(tiny_encoder)
    assert noise_parameter_names(model, "auto") == noise_parameter_names(model, "head")
    for name, p in model.named_parameters():
        if "embeddings" in name:
            p.requires_grad_(False)
    names = noise_parameter_names(model, "auto")
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("embeddings" in n for n in names) and "backbone.encoder.layer.0." \
        "attention.self.query.weight" in names


# -- averaging and voting -------------------------------------------------------------------
def test_uniform_average_is_exact(tiny_encoder):
    models = [_model(tiny_encoder) for _ in range(3)]
    frozen = "backbone.embeddings.word_embeddings.weight"
    for value, m in zip((1.0, 2.0, 6.0), models, strict=True):
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.fill_(value + (0.5 if name == "head.bias" else 0.0))
    models[0].get_parameter(frozen).requires_grad_(False)
    average_into(models[0], models)
    for name, p in models[0].named_parameters():
        want = 1.0 if name == frozen else (3.5 if name == "head.bias" else 3.0)
        assert torch.equal(p.detach(), torch.full_like(p, want)), name


def test_majority_vote_and_mean_probability_are_exact():
    # 3 members, 4 examples, 3 classes
    a = np.array([[2, 0, 0], [0, 1, 0], [0, 0, 5], [1, 0, 0]], dtype=np.float32)
    b = np.array([[1, 0, 0], [0, 0, 1], [0, 3, 0], [0, 1, 0]], dtype=np.float32)
    c = np.array([[0, 3, 0], [0, 2, 0], [0, 0, 1], [0, 0, 9]], dtype=np.float32)
    shares = combine_outputs([a, b, c], label_kind="classification")
    np.testing.assert_array_equal(shares * 3, [[2, 1, 0], [0, 2, 1], [0, 1, 2], [1, 1, 1]])

    def softmax(x):
        x = x.astype(np.float64)
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    mean = combine_outputs([a, b, c], label_kind="classification", vote="mean")
    np.testing.assert_allclose(mean, (softmax(a) + softmax(b) + softmax(c)) / 3, rtol=1e-12)
    # the three-way tie in row 4 goes to the class with the highest mean probability (2)
    assert combine_labels([a, b, c]).tolist() == [0, 1, 2, 2]
    assert combine_labels([a, b, c], vote="mean").tolist() == mean.argmax(1).tolist()
    np.testing.assert_allclose(
        combine_outputs([a[:, 0], b[:, 0], c[:, 0]], label_kind="regression"),
        [1.0, 0.0, 0.0, 1 / 3])
    # one member: probabilities, not a one-hot vote
    np.testing.assert_allclose(combine_outputs([a], label_kind="classification"), softmax(a),
                               rtol=1e-6)


def test_evaluate_uses_the_combined_vote(tiny_encoder, small_task):
    members = [_model(tiny_encoder, seed=s) for s in (1, 2, 3)]
    result = StabilizedModel("ensemble", "classification", members[0], members, 3, 0.0, [])
    outputs = [T.predict(m, small_task.test) for m in members]
    want = T.metrics_from_outputs(combine_labels(outputs), small_task.test.labels,
                                  "classification")
    assert result.evaluate(small_task) == want
    np.testing.assert_allclose(result.predict(small_task.test),
                               combine_outputs(outputs, label_kind="classification"))
    with pytest.raises(ValueError, match="start with 'model'"):
        StabilizedModel("ensemble", "classification", members[1], members, 3, 0.0, [])


# -- training -------------------------------------------------------------------------------
def test_none_is_plain_finetune(tiny_encoder, small_task):
    ref = _model(tiny_encoder)
    plain = finetune(ref, small_task.train, label_kind="classification", settings=SETTINGS,
                     progress=False)
    model = _model(tiny_encoder)
    result = train_stabilized(model, small_task.train, label_kind="classification",
                              settings=SETTINGS, stabilizer=StabilizerSettings(),
                              progress=False)
    assert result.model is model and result.members == [model]
    assert result.losses == plain.losses and result.model_steps == plain.steps == 24
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    np.testing.assert_allclose(result.predict(small_task.test).sum(1), 1.0, rtol=1e-6)


def _count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = T.train_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", counting)
    return calls


@pytest.mark.parametrize("kwargs,model_steps,members", [
    (dict(kind="none"), 24, 1),
    (dict(kind="swa", swa_every=5), 24, 1),
    (dict(kind="ensemble", members=3), 3 * 24, 3),
    (DENI, 24 + 2 * (3 + 3 + 2), 3),
])
def test_model_steps_are_the_optimizer_steps_run(tiny_encoder, small_task, monkeypatch, kwargs,
                                                 model_steps, members):
    calls = _count_steps(monkeypatch)
    result = train_stabilized(_model(tiny_encoder), small_task.train,
                              label_kind="classification", settings=SETTINGS,
                              stabilizer=StabilizerSettings(**kwargs), progress=False)
    assert result.model_steps == len(calls) == model_steps
    assert len(result.members) == members and result.steps == 24
    assert result.to_dict()["model_steps"] == model_steps


def test_ensemble_member_zero_is_the_plain_run_and_members_differ(tiny_encoder, small_task):
    ref = _model(tiny_encoder)
    finetune(ref, small_task.train, label_kind="classification", settings=SETTINGS,
             progress=False)
    result = train_stabilized(_model(tiny_encoder), small_task.train,
                              label_kind="classification", settings=SETTINGS,
                              stabilizer=StabilizerSettings(kind="ensemble", members=2),
                              progress=False)
    assert torch.equal(result.members[0].head.weight, ref.head.weight)
    assert not torch.equal(result.members[1].head.weight, ref.head.weight)


def test_swa_average_is_the_mean_of_the_snapshots(tiny_encoder, small_task, monkeypatch):
    from torch.optim.swa_utils import AveragedModel

    snapshots: list[list[torch.Tensor]] = []
    real = AveragedModel.update_parameters

    def recording(self, model):
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return real(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", recording)
    model = _model(tiny_encoder)
    result = train_stabilized(model, small_task.train, label_kind="classification",
                              settings=SETTINGS,
                              stabilizer=StabilizerSettings(kind="swa", swa_every=5),
                              progress=False)
    # swa from ceil(0.25 * 24) = 6 steps: snapshots after steps 11, 16, 21 and the last, 24
    assert len(snapshots) == 4 and result.model is model
    for i, p in enumerate(model.parameters()):
        want = torch.stack([s[i] for s in snapshots]).mean(0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_a_short_deni_run(tiny_encoder, small_task, monkeypatch, caplog):
    averaged_at: list[int] = []
    real_average = S.average_into

    def recording(target, models):
        averaged_at.append(len(models))
        return real_average(target, models)

    monkeypatch.setattr(S, "average_into", recording)
    model = _model(tiny_encoder)
    result = train_stabilized(model, small_task.train, label_kind="classification",
                              settings=SETTINGS, stabilizer=StabilizerSettings(**DENI),
                              progress=False)
    assert averaged_at == [3, 3]  # two interpolation rounds of M = 3 models
    assert result.model is model and len(result.members) == 3 and result.warnings == []
    assert [e.start for e in result.schedule.events] == [8, 11, 22]
    assert len(result.losses) == 24 and all(np.isfinite(result.losses))
    heads = [m.head.weight for m in result.members]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    shares = result.predict(small_task.test)
    assert shares.shape == (len(small_task.test), 2)
    np.testing.assert_allclose(shares.sum(1), 1.0)
    assert set(np.unique(shares * 3).round(6)) <= {0.0, 1.0, 2.0, 3.0}
    metrics = result.evaluate(small_task)
    assert set(metrics) == {"accuracy", "macro_f1"}

    # an interval too long for the window: the run says so and keeps the ensemble
    with caplog.at_level("WARNING", logger="stepstone.finetune.stabilize"):
        short = train_stabilized(_model(tiny_encoder), small_task.train,
                                 label_kind="classification", settings=SETTINGS,
                                 stabilizer=StabilizerSettings(kind="deni", members=2),
                                 progress=False)
    assert "no noisy-interpolation round fits" in caplog.text
    assert short.warnings and short.model_steps == 24 + 2 and len(short.members) == 2


@pytest.mark.parametrize("copy_lr", ["current", "peak"])
def test_copies_get_fresh_adamw_at_constant_group_lrs(tiny_encoder, small_task, copy_lr):
    model = _model(tiny_encoder)
    dist = "llrd:1e-3,0.5"
    opt, sched = T.build_optimizer(model, SETTINGS, 24, dist)
    data = T.TrainingData(model.encoder, small_task.train, label_kind="classification",
                          batch_size=4)
    for _, inputs, targets in list(data.batches(data.epoch_order(np.random.default_rng(0))))[:5]:
        T.train_step(model, opt, inputs, targets, label_kind="classification", max_grad_norm=1)
        sched.step()
    stab = StabilizerSettings(kind="deni", members=3, copy_lr=copy_lr)
    event = DeniEvent("interpolate", 5, 3, 0.1)
    copies = S._make_copies(model, opt, event, count=2, names=noise_parameter_names(model, "head"),
                            generator=torch.Generator().manual_seed(0), settings=SETTINGS,
                            stabilizer=stab, lr_distribution=dist)
    peak = [g["lr"] for g in T.build_optimizer(model, SETTINGS, None, dist)[0].param_groups]
    for c, c_opt in copies:
        assert c is not model and c.encoder.model is c.backbone and len(c_opt.state) == 0
        want = [g["lr"] for g in opt.param_groups] if copy_lr == "current" else peak
        assert [g["lr"] for g in c_opt.param_groups] == want
        assert torch.equal(c.backbone.embeddings.word_embeddings.weight,
                           model.backbone.embeddings.word_embeddings.weight)
        assert not torch.equal(c.head.weight, model.head.weight)
    assert [g["lr"] for g in opt.param_groups] != peak  # the main schedule had moved on


def _assert_same_members(a, b) -> None:
    assert len(a.members) == len(b.members)
    for ma, mb in zip(a.members, b.members, strict=True):
        for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values(),
                                strict=True):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("kwargs", [
    dict(kind="swa", swa_start=0.99),  # SWA would start after the last step
    dict(kind="deni", members=2, interpolation_interval=100, ensemble_start=0.99),  # no event
])
def test_a_switched_off_stabiliser_is_the_plain_run(tiny_encoder, small_task, kwargs):
    ref = _model(tiny_encoder)
    plain = finetune(ref, small_task.train, label_kind="classification", settings=SETTINGS,
                     progress=False)
    result = train_stabilized(_model(tiny_encoder), small_task.train,
                              label_kind="classification", settings=SETTINGS,
                              stabilizer=StabilizerSettings(**kwargs), progress=False)
    assert result.losses == plain.losses and result.model_steps == 24 and result.warnings
    for (name, a), b in zip(ref.state_dict().items(), result.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


@pytest.mark.heavy  # kills and resumes five runs: `make test`, not test-fast
@pytest.mark.parametrize("kwargs,every", [
    (dict(kind="swa", swa_every=5), 5),   # killed before SWA starts (step 6)
    (dict(kind="swa", swa_every=5), 7),   # killed with an average and SWALR running
    (DENI, 10),                           # killed inside the first interpolation round
    (DENI, 23),                           # killed inside the delayed ensemble
    (dict(kind="ensemble", members=2), 5),
])
def test_stabilized_runs_resume_to_the_uninterrupted_result(tiny_encoder, small_task, tmp_path,
                                                            monkeypatch, kwargs, every):
    stabilizer = StabilizerSettings(**kwargs)
    run = dict(label_kind="classification", settings=SETTINGS, stabilizer=stabilizer,
               progress=False)
    full = train_stabilized(_model(tiny_encoder), small_task.train, **run)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        die_after_checkpoint(m)
        with pytest.raises(KeyboardInterrupt):
            train_stabilized(_model(tiny_encoder), small_task.train, checkpoint_dir=ckpt,
                             checkpoint_every=every, **run)
    resumed = train_stabilized(_model(tiny_encoder), small_task.train, checkpoint_dir=ckpt,
                               checkpoint_every=every, **run)
    assert resumed.losses == full.losses and resumed.model_steps == full.model_steps
    _assert_same_members(full, resumed)
    assert not any(ckpt.rglob(T.CHECKPOINT_STATE))  # removed on success


def test_a_checkpoint_resumes_only_under_the_same_stabiliser(tiny_encoder, small_task,
                                                             tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        die_after_checkpoint(m)
        with pytest.raises(KeyboardInterrupt):
            finetune(_model(tiny_encoder), small_task.train, label_kind="classification",
                     settings=SETTINGS, progress=False, checkpoint_dir=ckpt, checkpoint_every=4)
    with pytest.raises(T.TrainingError, match="different run"):
        train_stabilized(_model(tiny_encoder), small_task.train, label_kind="classification",
                         settings=SETTINGS, stabilizer=StabilizerSettings(kind="swa"),
                         progress=False, checkpoint_dir=ckpt, checkpoint_every=4)
