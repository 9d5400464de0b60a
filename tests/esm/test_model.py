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


@pytest.mark.parametrize("arch", ["linear", "lowrank", "mlp"])
def test_fit_save_load_roundtrip(tmp_path, tiny_encoder, arch):
    X, Y = _pairs()
    cfg = ESMConfig(encoder={"name": tiny_encoder.name, "fingerprint": "f" * 16,
                             "pooling": "mean", "max_length": 32, "layer": None},
                    task_id="toy")
    esm, result = fit_esm(X, Y, architecture=arch, rank=4, hidden_dim=32,
                          settings=ESMFitSettings(epochs=30), config=cfg)
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
    esm, result = fit_esm(X, Y, settings=ESMFitSettings(epochs=40, seed=1))
    assert result.val_mse < 1e-3
    again, _ = fit_esm(X, Y, settings=ESMFitSettings(epochs=40, seed=1))
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
