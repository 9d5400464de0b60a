import copy

import numpy as np
import pytest
import torch

from stepstone.finetune.forgetting import Retention, backward_transfer, linear_cka, weight_drift
from stepstone.finetune.train import TaskModel


def test_retention_and_bwt():
    r = Retention(before=0.9, after=0.72)
    assert r.delta == pytest.approx(-0.18) and r.ratio == pytest.approx(0.8)
    acc = np.array([[0.9, 0.0, 0.0], [0.8, 0.85, 0.0], [0.7, 0.75, 0.95]])
    assert backward_transfer(acc) == pytest.approx(((0.7 - 0.9) + (0.75 - 0.85)) / 2)
    with pytest.raises(ValueError, match="square"):
        backward_transfer(np.zeros((2, 3)))


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 8))
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert linear_cka(X, 3.0 * X @ Q + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(X, rng.normal(size=(100, 8))) < 0.3
    # brute force with the HSIC formula: tr(K H L H) / sqrt(tr(KHKH) tr(LHLH))
    Y = X[:, :4] + 0.5 * rng.normal(size=(100, 4))
    H = np.eye(100) - 1 / 100
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return np.trace(A @ H @ B @ H)

    assert linear_cka(X, Y) == pytest.approx(hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L)))


def test_weight_drift(tiny_encoder):
    model = TaskModel(tiny_encoder, 2)
    reference = copy.deepcopy(tiny_encoder.model)
    assert all(v == 0 for v in weight_drift(reference, model).values())
    with torch.no_grad():
        for p in model.backbone.encoder.layer[1].parameters():
            p.mul_(1.1)
    drift = weight_drift(reference, model)
    assert drift["layer.1"] == pytest.approx(0.1, rel=1e-5)
    assert drift["layer.0"] == 0 and drift["embeddings"] == 0
    # the head group holds the unchanged pooler and the fresh head, which has no
    # pre-trained counterpart and is skipped: moving it moves nothing
    assert drift["head"] == 0
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.backbone.pooler.dense.bias.add_(1.0)
    bias = tiny_encoder.model.pooler.dense.bias.detach()
    pooler = reference.pooler.dense
    want = float(bias.sub(pooler.bias.detach()).norm() / torch.cat(
        [pooler.weight.detach().flatten(), pooler.bias.detach()]).norm())
    assert weight_drift(reference, model)["head"] == pytest.approx(want, rel=1e-6)
