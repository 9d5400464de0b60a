"""Golden values pinned before the foundation clean-up (issue 13): refactoring must not
change a number the project produces. ``tests/golden/values.json`` was written by the
code as it stood before the clean-up (commit 8e3ee63); the tiny transfer numbers below
likewise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_transfer_world

GOLDEN = json.loads((Path(__file__).parent / "golden" / "values.json").read_text())

# (distribution, seed, target, baseline, source_after, probe_after, drift of layer.1 after
# source then target) per run of the tiny transfer below
TINY_TRANSFER = [
    ("flat:1e-3", 0, 0.6, 0.5, 0.8333333333333334, 1.0, 0.033040420141105524),
    ("llrd:1e-3,0.5", 0, 0.8, 0.5, 0.5833333333333334, 0.8333333333333334, 0.03015891224370035),
    ("flat:1e-3", 1, 0.7, 0.6, 0.9166666666666666, 1.0, 0.03442650698087817),
    ("llrd:1e-3,0.5", 1, 0.7, 0.4, 0.8333333333333334, 0.9166666666666666, 0.029500313736405437),
]


@pytest.mark.slow
def test_builtin_data_hashes_unchanged():
    from stepstone.esm.catalog import builtin_ids, is_available, load_builtin

    # every pinned task (the 13 pinned before the clean-up and the catalog's later
    # additions, pinned before the v2 transfer matrix) is still there with the same data
    available = {t for t in builtin_ids() if is_available(t)}
    pinned = GOLDEN["data_hashes"]
    assert set(pinned) <= available, f"pinned tasks gone: {set(pinned) - available}"
    for task_id in sorted(pinned):
        assert load_builtin(task_id).data_hash() == pinned[task_id], task_id


@pytest.mark.slow
def test_readme_ranking_unchanged():
    """`stepstone rank builtin:movie_polarity` on the shipped registry: ids and scores
    (re-pinned when the shipped registry became the v2 matrix's ESMs, issue 14)."""
    from stepstone.selection.ranking import rank

    ranking = rank("builtin:movie_polarity", progress=False, cache=False)
    got = [(row.esm_id, row.score) for row in ranking.rows]
    want = GOLDEN["rank_movie_polarity"]
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=0, atol=1e-6)
    assert ranking.reference == pytest.approx(GOLDEN["rank_reference"], abs=1e-6)


@pytest.mark.slow
def test_transfer_matrix_protocol_key_unchanged():
    from stepstone.esm.encoder import load_encoder
    from tests.conftest import load_benchmark

    tm = load_benchmark("transfer_matrix")
    record = tm.Protocol().record(load_encoder())
    assert tm.Protocol.key_of(record) == GOLDEN["protocol_key"]


def test_tiny_transfer_report_unchanged(tmp_path, tiny_model_dir):
    from stepstone.finetune.train import FinetuneSettings
    from stepstone.finetune.transfer import TransferSettings, transfer

    encoder, source, target = tiny_transfer_world(tmp_path, tiny_model_dir, keep_models=True)
    settings = TransferSettings(
        seeds=2, source_max_examples=40, target_max_examples=24, max_eval=16,
        probe_examples=24, cka_examples=8, curve_examples=8,
        finetune=FinetuneSettings(lr=1e-3, epochs=2, batch_size=8))
    report = transfer(target, source, registry=tmp_path / "reg", encoder=encoder,
                      lr_distributions=["flat:1e-3", "llrd:1e-3,0.5"], settings=settings,
                      out=tmp_path / "out", progress=False)
    got = [(r["distribution"], r["seed"], r["target"], r["baseline"], r["source_after"],
            r["probe_after"], r["drift"]["transfer"]["layer.1"]) for r in report.runs]
    assert [g[:2] for g in got] == [w[:2] for w in TINY_TRANSFER]
    np.testing.assert_allclose([g[2:] for g in got], [w[2:] for w in TINY_TRANSFER],
                               rtol=0, atol=1e-6)
