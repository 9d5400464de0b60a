"""What keeps ``rank`` O(K) outside embedding and exact scoring (issue 16): candidates
selected in SQL, the target's own ESMs found from the kept candidates' configs only, the
gain model's sample scored in the same pass, leakage keys hashed once, and the skipped
ESMs summarised. Each new path is checked against the brute-force one it replaces."""

import dataclasses

import numpy as np
import pytest
import torch

from stepstone.esm.data import make_task, normalize_text
from stepstone.esm.leakage import _hash, overlap, text_keys
from stepstone.esm.model import EmbeddingSpaceMap, ESMConfig
from stepstone.esm.registry import Registry
from stepstone.selection.gain import GainModel
from stepstone.selection.index import sketch_index
from stepstone.selection.ranking import (
    _OWN_DATA,
    SKIPPED_SHOWN,
    Ranking,
    _candidates,
    _gain_model,
    _gain_sample,
    _gains,
    prepare_target,
    rank,
    skipped_summary,
)
from stepstone.selection.scorers import get_scorer
from tests.conftest import make_texts


def _esm(identity, W, b, task_id, data_hash=""):
    d = identity.dim
    esm = EmbeddingSpaceMap(ESMConfig(encoder=dataclasses.asdict(identity), task_id=task_id,
                                      in_dim=d, out_dim=d, task_data_hash=data_hash))
    with torch.no_grad():
        esm.linear.weight.copy_(torch.as_tensor(W))
        esm.linear.bias.copy_(torch.as_tensor(b))
    return esm


def _registry(folder, identity, n, *, other=0, own_hash="", own_at=None, seed=0):
    """``n`` ESMs of ``identity`` (``own_at``: the one recording ``own_hash``) and
    ``other`` ESMs of an encoder with another fingerprint, each with a task vector."""
    rng = np.random.default_rng(seed)
    d = identity.dim
    reg = Registry(folder, "w", create=True)
    far = dataclasses.replace(identity, fingerprint="0" * 16)
    for i in range(n + other):
        ident = identity if i < n else far
        W = np.eye(d) + rng.normal(size=(d, d)) / d
        esm = _esm(ident, W, 0.1 * rng.normal(size=d), f"task{(7 * i) % (n + other)}",
                   own_hash if i == own_at else "")
        reg.add(esm, esm_id=f"e{i:02d}", settings_key=f"k{i}",
                task_vector=rng.normal(size=d).astype(np.float32))
    return reg


@pytest.fixture()
def target_task():
    texts, labels = make_texts(50, seed=99)
    return make_task("tgt", texts, labels)


def test_registry_selects_ids_in_sql_like_the_entries(tmp_path, tiny_encoder):
    ident = tiny_encoder.identity
    reg = _registry(tmp_path, ident, 5, other=3)
    entries = reg.entries()
    for enc in reg.encoders():
        assert reg.ids(encoders=[enc]) == [e.id for e in entries if e.encoder_identity == enc]
    assert reg.ids() == [e.id for e in entries] and reg.ids(encoders=[]) == []
    assert reg.ids(task_ids=["task0", "task3"]) == [e.id for e in entries
                                                     if e.task_id in ("task0", "task3")]
    wanted = ["e06", "nope", "e01", "e04"]
    assert [e.id for e in reg.entries_for(wanted)] == ["e06", "e01", "e04"]
    assert reg.entries_for(["e02"])[0] == reg.get("e02")


def test_candidates_equal_the_python_rule_over_every_row(tmp_path, tiny_encoder, target_task):
    reg = _registry(tmp_path, tiny_encoder.identity, 6, other=4)
    target = prepare_target(target_task, tiny_encoder)
    ids, skipped = _candidates(reg, target)
    brute = [e for e in reg.entries() if not e.encoder_identity.mismatches(target.encoder)]
    assert ids == [e.id for e in brute] and len(ids) == 6
    assert set(skipped) == {e.id for e in reg.entries()} - set(ids)
    assert all(why.startswith("made for another encoder: ") and "fingerprint" in why
               for why in skipped.values())


def test_own_esm_is_excluded_with_and_without_first_stage(tmp_path, tiny_encoder,
                                                          target_task):
    """An ESM of the target's data under another name: without a first stage every
    config is read; with one only the kept candidates', and the K kept are the K best
    of the others, as if it had been excluded before the search."""
    reg = _registry(tmp_path, tiny_encoder.identity, 10, other=2,
                    own_hash=target_task.data_hash(), own_at=4)
    kw = dict(encoder=tiny_encoder, cache=False, progress=False, gain=False,
              check_leakage=False, method="random")
    full = rank(target_task, reg, **kw)
    assert full.skipped["e04"] == _OWN_DATA and full.settings["excluded_target"] == ["e04"]
    index = sketch_index(reg)
    target = prepare_target(target_task, tiny_encoder)
    query = index.query(target.X, target.labels)
    order = sorted((i for i in reg.ids(encoders=[tiny_encoder.identity])),
                   key=lambda i: -float(index.vector(i) @ query))
    for k in (1, 3, 9):
        pre = rank(target_task, reg, prefilter=k, **kw)
        assert sorted(r.esm_id for r in pre.rows) == sorted(
            [i for i in order if i != "e04"][:k])
        if "e04" in order[:k]:  # met by the first stage: listed as own data
            assert pre.skipped["e04"] == _OWN_DATA
            assert pre.settings["excluded_target"] == ["e04"]
        assert set(pre.skipped) - {"e04"} == {"e10", "e11"}
    kept_all = rank(target_task, reg, prefilter=50, **kw)
    assert kept_all.skipped == full.skipped and len(kept_all) == len(full) == 9


def test_gain_sample_scored_in_one_pass_equals_scoring_it_again(tmp_path, tiny_encoder,
                                                                target_task):
    reg = _registry(tmp_path, tiny_encoder.identity, 6)
    model = GainModel(mean_=[0.0, 0.0, 0.3, 1.5], scale_=[0.05, 1.0, 0.2, 0.1],
                      coef_=[3.0, 0.4, -1.5, -0.2], intercept_=-0.5,
                      residual_quantiles_=(-9.0, 8.0), targets_=["a", "b", "c"],
                      sources_=["task0"], meta={"target_max_train": 20})
    scorer = get_scorer("esm-logme", chunk=4)  # chunks across the candidate list
    target = prepare_target(target_task, tiny_encoder)
    entries = reg.entries()
    applies, unavailable = _gain_model(model, method="esm-logme", encoder=tiny_encoder)
    sample = _gain_sample(applies, target)
    assert unavailable is None and sample is not None and sample.n == 20
    # drawn from the embedded target's own rows, stratified
    rows = [target.texts.index(t) for t in sample.texts]
    np.testing.assert_array_equal(sample.X, target.X[rows])
    assert sorted(np.unique(sample.labels)) == sorted(np.unique(target.labels))
    scores, on_sample = scorer.score_targets([target, sample], reg, entries)
    alone = scorer.score(target, reg, entries)
    assert scores.values == alone.values
    common = dict(method="esm-logme", reg=reg, prepared=target, entries=entries,
                  scores=scores.values, reference=target.base_logme(), scorer=scorer,
                  sample=sample, min_gain=0.0)
    one_pass = _gains(applies, None, sample_scores=on_sample.values, **common)
    again = _gains(applies, None, sample_scores=None, **common)
    assert set(one_pass[1]) == set(again[1]) == {e.id for e in entries}
    for k, p in again[1].items():
        q = one_pass[1][k]
        assert abs(p.gain - q.gain) < 1e-9 and abs(p.low - q.low) < 1e-9
    assert one_pass[2].esm_id == again[2].esm_id and one_pass[2].notes == again[2].notes
    ranked = rank(target_task, reg, encoder=tiny_encoder, cache=False, progress=False,
                  gain=model, check_leakage=False)
    for row in ranked.rows:
        assert abs(row.predicted_gain - again[1][row.esm_id].gain) < 1e-9


def test_leakage_overlap_hashes_the_target_once_and_counts_as_before():
    target = ["A cat.", "a  CAT.", "dog", "dog", "Bird", "fish"]
    source = ["a cat.", "dog", "bird ", "owl"]

    def brute(target, source):  # the per-source formula it replaces
        keys = text_keys(source)
        distinct = {normalize_text(t): t for t in target}
        return (sum(_hash(t) in set(keys["exact"]) for t in set(target)),
                sum(_hash(k) in set(keys["normalised"]) for k in distinct), len(distinct))

    got = overlap(target, source)
    assert (got.exact, got.normalised, got.of) == brute(target, source) == (1, 3, 4)


def test_many_skipped_esms_are_summarised_by_reason():
    skipped = {f"far{i}": f"made for another encoder: 'x' differs in fingerprint ({i})"
               for i in range(SKIPPED_SHOWN)}
    skipped["mine"] = _OWN_DATA
    skipped["cut"] = "filtered out: --where 'examples>=9' (num_examples is 3)"
    lines = skipped_summary(skipped)
    assert lines[0].startswith(f"{SKIPPED_SHOWN} made for another encoder: far0, far1, "
                               "far2, ... (e.g. far0: made for another encoder: 'x'")
    assert lines[1] == f"1 built from the target's own data: mine (e.g. mine: {_OWN_DATA})"
    assert lines[2].startswith("1 filtered out: --where 'examples>=9': cut")
    text = str(Ranking("t", "random", [], skipped=skipped))
    assert f"{SKIPPED_SHOWN + 2} ESM(s) not ranked (each with its reason under 'skipped' " \
           "in --json):" in text
    assert "far5" not in text and len(text.splitlines()) < 10
    few = str(Ranking("t", "random", [], skipped={"mine": _OWN_DATA}))
    assert f"1 ESM(s) not ranked:\n  mine: {_OWN_DATA}" in few


def test_the_gain_sample_embeds_nothing_and_caching_changes_no_prediction(
        tmp_path, tiny_encoder, target_task, monkeypatch):
    """The gain model's sample comes from the rows the ranking embedded: one embedding
    pass with or without the disk cache, and the same predictions, bit for bit."""
    from stepstone.esm.cache import EmbeddingCache

    reg = _registry(tmp_path, tiny_encoder.identity, 4)
    model = GainModel(mean_=[0.0, 0.0, 0.3, 1.5], scale_=[0.05, 1.0, 0.2, 0.1],
                      coef_=[3.0, 0.4, -1.5, -0.2], intercept_=-0.5,
                      residual_quantiles_=(-9.0, 8.0), targets_=["a", "b", "c"],
                      sources_=["task0"], meta={"target_max_train": 20})
    embedded: list[int] = []
    real = type(tiny_encoder)._encode_uncached
    monkeypatch.setattr(type(tiny_encoder), "_encode_uncached",
                        lambda self, texts, *a: embedded.append(len(texts)) or real(
                            self, texts, *a))
    kw = dict(encoder=tiny_encoder, progress=False, gain=model, check_leakage=False)
    no_cache = rank(target_task, reg, cache=False, **kw)
    assert len(embedded) == 1  # the target once; the 20-example sample is drawn from it
    assert any("20-example sample" in note for note in no_cache.recommendation.notes)
    with_cache = rank(target_task, reg, cache=EmbeddingCache(tmp_path / "cache"), **kw)
    assert [r.predicted_gain for r in no_cache.rows] == [
        r.predicted_gain for r in with_cache.rows]
    assert all(r.predicted_gain is not None for r in no_cache.rows)
