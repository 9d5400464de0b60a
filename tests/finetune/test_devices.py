"""Every forward pass in finetune gets its batch on the model's device, and every copy
keeps the device: the weights sit on ``meta`` and a guard checks each forward's inputs
(tests/conftest.py ``guard_devices``), so a batch left on the CPU fails without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepstone.finetune.forgetting import layer_cka, linear_probe
from stepstone.finetune.stabilize import StabilizerSettings, train_stabilized
from stepstone.finetune.train import FinetuneSettings, TaskModel, finetune, predict
from stepstone.finetune.transfer import _fresh_model
from tests.conftest import ReachedForward

SETTINGS = FinetuneSettings(epochs=1, batch_size=8)


def _on_meta(model: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def test_training_and_prediction(meta_encoder, small_task):
    model = TaskModel(meta_encoder, 2)
    assert _on_meta(model)
    with pytest.raises(ReachedForward):
        finetune(model, small_task.train, label_kind="classification", settings=SETTINGS,
                 progress=False)
    for kind in ("swa", "deni"):
        with pytest.raises(ReachedForward):
            train_stabilized(TaskModel(meta_encoder.copy(), 2), small_task.train,
                             label_kind="classification", settings=SETTINGS,
                             stabilizer=StabilizerSettings(kind=kind), progress=False)
    with pytest.raises(ReachedForward):
        predict(model, small_task.test)


def test_forgetting_measures(meta_encoder, small_task):
    with pytest.raises(ReachedForward):
        layer_cka(meta_encoder, meta_encoder.copy(), small_task.test.inputs())
    with pytest.raises(ReachedForward):
        linear_probe(meta_encoder, small_task.train, small_task.test,
                     label_kind="classification")


def test_transfer_copies_keep_the_device(meta_encoder, small_task):
    model = _fresh_model(meta_encoder, 2, SETTINGS)
    assert model.encoder is not meta_encoder and _on_meta(model)
    assert model.encoder.device.type == "meta"
    with pytest.raises(ReachedForward):
        finetune(model, small_task.train, label_kind="classification", settings=SETTINGS,
                 progress=False)


def test_kernel_features(meta_encoder, small_task):
    from stepstone.selection.entk import compute_kernel
    from stepstone.selection.entk_formulations import ClassifierFormulation, TensorFormulation
    from tests.conftest import guard_devices

    texts = small_task.train.inputs()[:4]
    with pytest.raises(ReachedForward):
        compute_kernel(ClassifierFormulation(TaskModel(meta_encoder, 2)), texts, texts[:2],
                       progress=False)
    linear = guard_devices(torch.nn.Linear(3, 2, device="meta"))
    with pytest.raises(ReachedForward):
        compute_kernel(TensorFormulation(linear, 2), np.ones((4, 3)), progress=False)
