"""Two encoder families through one code path: the tiny random BERT and a tiny random
MPNet (12 layers, like all-mpnet-base-v2). Nothing may assume MiniLM's 384 dims or 6
layers: loading, pooling, early exit, layer groups and the Kenneweg distribution are
checked on both."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

from stepstone.esm.encoder import load_encoder, mean_pool
from stepstone.esm.taskmodel import TaskModel
from stepstone.finetune.lr import (
    KENNEWEG_BASE_LR,
    KENNEWEG_RELATIVE,
    layer_groups,
    resolve_distribution,
)
from tests.conftest import WORDS, make_texts

MPNET_LAYERS, MPNET_DIM = 12, 16


def build_tiny_mpnet(folder):
    """A 12-layer, 16-dim random MPNetModel with a small WordPiece tokenizer."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    vocab = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *string.ascii_lowercase,
             *string.digits, *WORDS, *[f"##{c}" for c in string.ascii_lowercase]]
    tokenizer = MPNetTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))},
                                   do_lower_case=True)
    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=MPNET_DIM,
                         num_hidden_layers=MPNET_LAYERS, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=66,
                         pad_token_id=tokenizer.pad_token_id)
    MPNetModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_mpnet_dir(tmp_path_factory):
    return build_tiny_mpnet(tmp_path_factory.mktemp("tiny-mpnet"))


@pytest.fixture(params=["bert", "mpnet"])
def family(request, tiny_model_dir, tiny_mpnet_dir):
    """(folder, model class name, layers, dim) of one family."""
    if request.param == "bert":
        return tiny_model_dir, "BertModel", 2, 32
    return tiny_mpnet_dir, "MPNetModel", MPNET_LAYERS, MPNET_DIM


TEXTS = make_texts(12, seed=5)[0]


def test_loading_reads_width_and_depth_from_the_model(family):
    folder, cls, layers, dim = family
    enc = load_encoder(str(folder), max_length=32)
    assert type(enc.model).__name__ == cls
    assert (enc.dim, enc.num_layers, enc.identity.dim) == (dim, layers, dim)
    assert enc.embed(TEXTS, progress=False).shape == (len(TEXTS), dim)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_matches_the_hidden_states(family, pooling):
    folder, _, _, _ = family
    enc = load_encoder(str(folder), max_length=32, pooling=pooling)
    batch = enc.collate(TEXTS)
    with torch.no_grad():
        hidden = enc.model(**batch).last_hidden_state
    expected = hidden[:, 0] if pooling == "cls" else mean_pool(hidden, batch["attention_mask"])
    np.testing.assert_allclose(enc.embed(TEXTS, batch_size=5, progress=False),
                               expected.numpy(), rtol=1e-5, atol=1e-5)


def test_early_exit_equals_the_full_models_hidden_state(family):
    folder, _, layers, _ = family
    enc = load_encoder(str(folder), max_length=32)
    batch = enc.collate(TEXTS)
    with torch.no_grad():
        states = enc.model(**batch, output_hidden_states=True).hidden_states
    assert len(states) == layers + 1
    for k in sorted({1, layers // 2, layers - 1} - {0}):
        short = enc.with_layer(k)
        assert short.num_layers == k and short.identity.layer == k
        np.testing.assert_allclose(short.embed(TEXTS, progress=False),
                                   mean_pool(states[k], batch["attention_mask"]).numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert enc.layer_similarities(TEXTS).shape == (layers - 1,)
    assert 1 <= enc.choose_exit_layer(TEXTS) <= layers


def test_layer_groups_and_kenneweg_by_depth(family):
    folder, _, layers, _ = family
    model = TaskModel(load_encoder(str(folder), max_length=32), 3)
    groups = layer_groups(model)
    assert groups.names == ("embeddings", *(f"layer.{i}" for i in range(layers)), "head")
    names = [n for g in groups.params for n in g]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(names) == len(set(names))
    # MPNet's relative position bias sits in its encoder, outside the layers, and every
    # layer reads it: it belongs with the embeddings, not with the task head.
    assert not any("relative_attention_bias" in n for n in groups.params[-1])
    rel = {g: v / KENNEWEG_BASE_LR for g, v in resolve_distribution("kenneweg", groups).items()}
    assert rel["embeddings"] == pytest.approx(1.0) and rel["head"] == pytest.approx(3.40)
    if layers == 12:  # all-mpnet-base-v2's depth: the paper's table applies layer by layer
        paper = [1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8]
        assert [rel[f"layer.{j}"] for j in range(12)] == pytest.approx(
            [KENNEWEG_RELATIVE[g] for g in paper])


def test_mpnet_relative_bias_is_in_the_embeddings_group(tiny_mpnet_dir):
    groups = layer_groups(load_encoder(str(tiny_mpnet_dir), max_length=32).model)
    assert "encoder.relative_attention_bias.weight" in groups.params[0]


def test_models_dir_makes_a_model_loadable_by_name(tiny_mpnet_dir, tmp_path, monkeypatch):
    """`make mpnet` joins all-mpnet-base-v2 into models_dir(); a name there loads."""
    import shutil

    from stepstone.esm.encoder import MODELS_ENV, resolve_model_path, stored_model_folder

    shutil.copytree(tiny_mpnet_dir, tmp_path / "models" / "tiny-mpnet")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    assert resolve_model_path("tiny-mpnet") == str(tmp_path / "models" / "tiny-mpnet")
    assert stored_model_folder("../models") is None and stored_model_folder("nope") is None
    enc = load_encoder("tiny-mpnet", max_length=32)
    assert enc.name == "tiny-mpnet" and enc.num_layers == MPNET_LAYERS
