"""Shared texts between a target and a source (stepstone.esm.leakage)."""

from __future__ import annotations

import json

import pandas as pd

from stepstone.esm.leakage import overlap, source_text_keys, text_keys
from tests.conftest import make_texts


def test_overlap_counts_exact_and_normalised_matches_once():
    source = ["Free prize now", "see you tomorrow", "the game was great"]
    target = ["Free prize now", "free  PRIZE now ", "see you tomorrow", "see you tomorrow",
              "an unrelated text"]
    found = overlap(target, source)
    # distinct after normalising: 'free prize now', 'see you tomorrow', 'an unrelated text'
    assert (found.exact, found.normalised, found.of) == (2, 2, 3)
    assert overlap(target, text_keys(source)) == found
    assert not overlap(["nothing shared"], source)
    assert "2 of 3 target texts (2 exact" in str(found)


def test_keys_of_an_esm_without_stored_keys_come_from_its_recorded_data(tmp_path,
                                                                       tiny_encoder):
    """ESMs built before keys were stored: the source data is reloaded from the recorded
    file (checked by data hash) and the keys are kept in the cache folder."""
    from stepstone.esm.registry import Registry
    from stepstone.finetune.build import BuildSettings, build_registry
    from stepstone.finetune.train import FinetuneSettings

    texts, labels = make_texts(40, seed=3)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "src.csv", index=False)
    build_registry(tmp_path / "reg", [str(tmp_path / "src.csv")], encoder=tiny_encoder,
                   progress=False, settings=BuildSettings(
                       max_examples=20, finetune=FinetuneSettings(epochs=1)))
    reg = Registry(tmp_path / "reg")
    (entry,) = reg.entries()
    stored = source_text_keys(reg, entry)
    assert stored == text_keys(texts)
    profile = reg.esm_dir(entry.id) / "profile.json"
    data = json.loads(profile.read_text())
    del data["text_keys"]
    profile.write_text(json.dumps(data))
    assert source_text_keys(reg, entry, cache_dir=tmp_path / "cache") == stored
    assert (tmp_path / "cache" / "text_keys").is_dir()
    (tmp_path / "src.csv").unlink()  # now from the cache folder only
    assert source_text_keys(reg, entry, cache_dir=tmp_path / "cache") == stored
    assert source_text_keys(reg, entry) is None  # unknown: no keys, no data, no cache
