import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stepstone.esm.encoder import EncoderMismatchError
from stepstone.esm.hfselect import read_hfselect_esm
from stepstone.esm.model import (
    EmbeddingSpaceMap,
    ESMConfig,
    ESMFitSettings,
    ESMFormatError,
    fit_esm,
)


def _pairs(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    W = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    Y = (X @ W.T + 0.5).astype(np.float32)
    return X, Y


@pytest.mark.parametrize("arch,method", [("linear", "ridge"), ("lowrank", "ridge"),
                                         ("linear", "adamw"), ("lowrank", "adamw"),
                                         ("mlp", "adamw")])
def test_fit_save_load_roundtrip(tmp_path, tiny_encoder, arch, method):
    X, Y = _pairs()
    cfg = ESMConfig(encoder={"name": tiny_encoder.name, "fingerprint": "f" * 16,
                             "pooling": "mean", "max_length": 32, "layer": None},
                    task_id="toy")
    esm, result = fit_esm(X, Y, architecture=arch, rank=4, hidden_dim=32,
                          settings=ESMFitSettings(method=method, epochs=30), config=cfg)
    zero = float(np.mean((X - Y) ** 2))
    assert result.train_mse < zero and result.val_mse is not None
    assert esm.config.metrics["train_mse"] == pytest.approx(result.train_mse)
    folder = esm.save(tmp_path / arch)
    data = json.loads((folder / "config.json").read_text())
    assert data["architecture"] == arch and data["versions"]["torch"] == torch.__version__
    loaded = EmbeddingSpaceMap.load(folder)
    np.testing.assert_allclose(loaded.transform(X), esm.transform(X), rtol=1e-6, atol=1e-6)
    affine = loaded.affine()
    if arch == "mlp":
        assert affine is None
    else:
        W, b = affine
        np.testing.assert_allclose(X @ W.T + b, loaded.transform(X), atol=1e-4)


def test_linear_fit_recovers_a_linear_map():
    X, Y = _pairs(n=2000, d=8)
    esm, result = fit_esm(X, Y, settings=ESMFitSettings(method="adamw", epochs=40, seed=1))
    assert result.val_mse < 1e-3
    again, _ = fit_esm(X, Y, settings=ESMFitSettings(method="adamw", epochs=40, seed=1))
    np.testing.assert_array_equal(esm.transform(X), again.transform(X))  # seeded


def test_load_refuses_other_encoder(tmp_path, tiny_model_dir):
    from stepstone.esm.encoder import load_encoder

    mean = load_encoder(str(tiny_model_dir))
    X, Y = _pairs(d=32)
    import dataclasses

    cfg = ESMConfig(encoder=dataclasses.asdict(mean.identity), task_id="toy")
    esm, _ = fit_esm(X, Y, config=cfg)
    esm.save(tmp_path / "e")
    EmbeddingSpaceMap.load(tmp_path / "e", encoder=mean.identity)
    cls = load_encoder(str(tiny_model_dir), pooling="cls")
    with pytest.raises(EncoderMismatchError, match="pooling"):
        EmbeddingSpaceMap.load(tmp_path / "e", encoder=cls.identity)
    with pytest.raises(EncoderMismatchError, match=r"shape \(n, 32\); got \(3, 5\)"):
        esm.transform(np.zeros((3, 5)))


def test_load_errors(tmp_path):
    X, Y = _pairs(d=4)
    esm, _ = fit_esm(X, Y, config=ESMConfig(task_id="t"))
    folder = esm.save(tmp_path / "e")
    data = json.loads((folder / "config.json").read_text())
    data["shiny_new_key"] = 1
    (folder / "config.json").write_text(json.dumps(data))
    EmbeddingSpaceMap.load(folder)  # unknown keys only warn
    del data["task_id"]
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ESMFormatError, match=r"lacks required key\(s\) \['task_id'\]"):
        EmbeddingSpaceMap.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ESMFormatError, match="has no model.safetensors"):
        EmbeddingSpaceMap.load(folder)


def _write_hfselect(folder, *, legacy: bool, d: int = 8):
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    w, b = torch.randn(d, d), torch.randn(d)
    prefix = "sequential.0" if legacy else "model"
    save_file({f"{prefix}.weight": w, f"{prefix}.bias": b}, str(folder / "model.safetensors"))
    cfg = {"base_model_name": "bert-base-uncased", "task_id": "imdb", "task_subset": None,
           "esm_architecture": "linear", "esm_embedding_dim": d, "num_examples": 1000,
           "lm_learning_rate": 2e-5, "esm_num_epochs": 10,
           "version": "0.1.0" if legacy else "0.2.1"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return w.numpy(), b.numpy()


@pytest.mark.parametrize("legacy", [False, True])
def test_hfselect_import(tmp_path, legacy):
    w, b = _write_hfselect(tmp_path / "esm", legacy=legacy)
    esm, key = read_hfselect_esm(tmp_path / "esm")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(esm.transform(x), x @ w.T + b, rtol=1e-5, atol=1e-5)
    assert esm.config.task_id == "imdb" and esm.config.encoder["name"] == "bert-base-uncased"
    assert esm.config.finetune == {"learning_rate": 2e-5}
    assert len(key) == 64


def test_hfselect_import_errors(tmp_path):
    _write_hfselect(tmp_path / "esm", legacy=False)
    cfg = json.loads((tmp_path / "esm" / "config.json").read_text())
    cfg["esm_embedding_dim"] = 16
    (tmp_path / "esm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ESMFormatError, match=r"weight shape \(8, 8\) does not match"):
        read_hfselect_esm(tmp_path / "esm")
    with pytest.raises(ESMFormatError, match="no config.json"):
        read_hfselect_esm(tmp_path)


def test_ridge_with_vanishing_strength_is_least_squares():
    """Reference: numpy's least squares on [X, 1]."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    Y = (X @ rng.normal(size=(12, 12)) + rng.normal(size=(300, 12)) * 0.1 + 2).astype(np.float32)
    esm, _ = fit_esm(X, Y, settings=ESMFitSettings(alpha=1e-10))
    W, b = esm.affine()
    sol = np.linalg.lstsq(np.c_[X, np.ones(len(X))].astype(np.float64), Y, rcond=None)[0]
    np.testing.assert_allclose(W, sol[:-1].T, atol=1e-5)
    np.testing.assert_allclose(b, sol[-1], atol=1e-5)


def test_ridge_shrinks_towards_the_identity_and_beats_it_on_held_out_pairs():
    X, Y = _pairs(n=200, d=16)
    Y = Y + np.random.default_rng(1).normal(size=Y.shape).astype(np.float32)  # noisy shift
    strong, _ = fit_esm(X, Y, settings=ESMFitSettings(alpha=1e6))
    W, _ = strong.affine()
    assert np.abs(W - np.eye(16)).max() < 1e-3
    esm, result = fit_esm(X, Y)  # strength chosen on the held-out pairs
    assert esm.config.fit["alpha_chosen"] == result.alpha and result.alpha < 1e6
    held_out = torch.randperm(200, generator=torch.Generator().manual_seed(0)).numpy()[:20]
    assert result.identity_val_mse == pytest.approx(
        float(np.mean((X[held_out].astype(np.float64) - Y[held_out]) ** 2)))
    assert 0 < result.shift_captured < 1
    assert esm.config.metrics["shift_captured"] == pytest.approx(result.shift_captured)
    assert result.val_mse < result.identity_val_mse


def test_reduced_rank_ridge_is_the_best_rank_r_map():
    """On noise-free pairs of a rank-r residual the low-rank fit is exact; with a lower
    rank than the truth it is no worse than the truncated true residual."""
    rng = np.random.default_rng(4)
    d, r = 20, 3
    X = rng.normal(size=(500, d)).astype(np.float32)
    R = rng.normal(size=(d, r)) @ rng.normal(size=(r, d)) / d
    Y = (X @ (np.eye(d) + R).T).astype(np.float32)
    exact, res = fit_esm(X, Y, architecture="lowrank", rank=r,
                         settings=ESMFitSettings(alpha=1e-10))
    assert res.train_mse < 1e-8
    low, res_low = fit_esm(X, Y, architecture="lowrank", rank=1,
                           settings=ESMFitSettings(alpha=1e-10))
    U, S, Vt = np.linalg.svd(X.astype(np.float64) @ R.T, full_matrices=False)
    best = np.mean((X @ R.T - U[:, :1] * S[:1] @ Vt[:1]) ** 2)  # Eckart-Young bound
    assert res_low.train_mse <= best * (1 + 1e-3) + 1e-9


def test_adamw_build_key_is_what_it_was_before_the_method_field():
    settings = ESMFitSettings(method="adamw")
    assert settings.key_dict() == {"epochs": 10, "batch_size": 32, "lr": 1e-3,
                                   "weight_decay": 0.01, "val_fraction": 0.1, "seed": 0}
    assert set(ESMFitSettings().key_dict()) == {"method", "alpha", "val_fraction", "seed"}


def test_settings_and_fit_errors_say_what_is_wrong():
    from stepstone.esm.errors import ConfigError
    from stepstone.esm.model import ESMFitError, check_fit

    with pytest.raises(ConfigError, match="'method' must be one of"):
        ESMFitSettings(method="sgd")
    with pytest.raises(ConfigError, match="no closed-form fit"):
        fit_esm(*_pairs(n=50, d=4), architecture="mlp")
    X, Y = _pairs(n=100, d=4)
    _, bad = fit_esm(X, X + 1e-4, settings=ESMFitSettings(method="adamw", epochs=1))
    with pytest.raises(ESMFitError, match="worse than the identity map"):
        check_fit(bad, what="source 'toy'")
