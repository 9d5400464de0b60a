import json

import pytest
from transformers import BertConfig, BertModel

from stepstone.esm.encoder import Encoder
from stepstone.finetune.lr import (
    KENNEWEG_BASE_LR,
    KENNEWEG_RELATIVE,
    layer_groups,
    param_groups,
    resolve_distribution,
)
from stepstone.finetune.train import TaskModel


def _model(layers: int, tiny_encoder):
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    enc = Encoder(BertModel(cfg), tiny_encoder.tokenizer, name="t")
    return TaskModel(enc, 3)


def test_every_parameter_in_exactly_one_group(tiny_encoder):
    model = _model(4, tiny_encoder)
    groups = layer_groups(model)
    assert groups.names == ("embeddings", "layer.0", "layer.1", "layer.2", "layer.3", "head")
    flat_names = [n for g in groups.params for n in g]
    assert sorted(flat_names) == sorted(n for n, _ in model.named_parameters())
    assert len(flat_names) == len(set(flat_names))
    assert all("encoder.layer.2." in n for n in groups.params[3])
    assert {"head.weight", "head.bias"} <= set(groups.params[-1])
    assert all("embeddings" in n for n in groups.params[0])


def test_flat_and_llrd_values(tiny_encoder):
    groups = layer_groups(_model(2, tiny_encoder))
    assert set(resolve_distribution("flat:2e-5", groups).values()) == {2e-5}
    llrd = resolve_distribution("llrd:1e-4,0.5", groups)
    assert llrd == pytest.approx({"head": 1e-4, "layer.1": 5e-5, "layer.0": 2.5e-5,
                                  "embeddings": 1.25e-5})


def test_kenneweg_on_bert_base_depth_is_the_paper_table(tiny_encoder):
    groups = layer_groups(_model(12, tiny_encoder))
    lrs = resolve_distribution("kenneweg", groups)
    rel = {g: v / KENNEWEG_BASE_LR for g, v in lrs.items()}
    expected_groups = [1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8]
    assert rel["embeddings"] == pytest.approx(1.0) and rel["head"] == pytest.approx(3.40)
    for j, g in enumerate(expected_groups):
        assert rel[f"layer.{j}"] == pytest.approx(KENNEWEG_RELATIVE[g])
    # 6 layers (MiniLM): layer j sits at BERT-base layer floor((j + .5) * 2) = 1, 3, ..., 11
    six = resolve_distribution("kenneweg", layer_groups(_model(6, tiny_encoder)))
    assert [six[f"layer.{j}"] / KENNEWEG_BASE_LR for j in range(6)] == pytest.approx(
        [KENNEWEG_RELATIVE[g] for g in (1, 3, 4, 5, 7, 8)])


def test_json_regex_and_errors(tiny_encoder, tmp_path):
    groups = layer_groups(_model(2, tiny_encoder))
    path = tmp_path / "lr.json"
    path.write_text(json.dumps({"embeddings": 1e-6, "layer\\.\\d+": 2e-6, "head": 3e-6}))
    assert resolve_distribution(str(path), groups)["layer.1"] == 2e-6
    path.write_text(json.dumps({"embeddings": 1e-6, "layers?\\.9": 2e-6, "head": 3e-6}))
    with pytest.raises(ValueError, match="matches no layer group"):
        resolve_distribution(str(path), groups)
    path.write_text(json.dumps({"embeddings": 1e-6, "head": 3e-6}))
    with pytest.raises(ValueError, match=r"No learning rate for layer group\(s\) \['layer.0'"):
        resolve_distribution(str(path), groups)
    for bad in ("flat", "llrd:1e-4", "cosine:1", "flat:abc", "nope.json"):
        with pytest.raises(ValueError):
            resolve_distribution(bad, groups)
    with pytest.raises(ValueError, match="positive and finite"):
        resolve_distribution("flat:-1", groups)


def test_param_groups_cover_model(tiny_encoder):
    model = _model(2, tiny_encoder)
    lrs = resolve_distribution("llrd:1e-3,0.9", layer_groups(model))
    pg = param_groups(model, lrs)
    assert sum(len(g["params"]) for g in pg) == len(list(model.parameters()))
    assert {g["group"]: g["lr"] for g in pg} == pytest.approx(lrs)


def test_finetune_applies_the_distribution(tiny_encoder, small_task):
    """llrd with decay 1e-6: the head learns, the embeddings (11 steps down) barely move."""
    import torch

    from stepstone.finetune.train import FinetuneSettings, finetune

    model = TaskModel(tiny_encoder, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(model, small_task.train, label_kind="classification", progress=False,
             settings=FinetuneSettings(epochs=1, batch_size=8, weight_decay=0.0),
             lr_distribution="llrd:1e-2,1e-6")
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["head.weight"] > 1e-3
    assert max(v for n, v in moved.items() if "embeddings" in n) < 1e-6
    assert torch.isfinite(model.head.weight).all()


def test_mapping_spec_like_a_json_file(tiny_encoder):
    groups = layer_groups(_model(2, tiny_encoder))
    lrs = resolve_distribution({"embeddings": 1e-6, r"layer\.\d": 2e-5, "head": 1e-4}, groups)
    assert lrs == {"embeddings": 1e-6, "layer.0": 2e-5, "layer.1": 2e-5, "head": 1e-4}
    with pytest.raises(ValueError, match="No learning rate for layer group"):
        resolve_distribution({"head": 1e-4}, groups)
    with pytest.raises(ValueError, match="positive and finite"):
        resolve_distribution({".*": float("nan")}, groups)
