"""Corrupt or untrusted ESM artefacts: flipped bytes, NaN weights, file modes, and a
config that points ``transfer`` at another file (issue 19)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from stepstone.esm.data import DataError, make_task
from stepstone.esm.model import ESMFormatError
from stepstone.esm.registry import DB_NAME, Registry, RegistryError, folder_checksum
from stepstone.esm.specs import load_task
from stepstone.selection.ranking import rank
from tests.conftest import make_texts
from tests.faults.conftest import TASKS, key_of, make_esm

IDS = [f"{t}-{key_of(t)[:8]}" for t in TASKS]


def _target():
    texts, labels = make_texts(50, seed=99)
    return make_task("tgt", texts, labels)


def _rank(folder, encoder):
    return rank(_target(), Registry(folder), encoder=encoder, cache=False, progress=False)


def _rechecksum(folder, esm_id):
    """What a writer would have recorded for the folder as it is now."""
    checksum, size = folder_checksum(folder / "esms" / esm_id)
    with sqlite3.connect(folder / DB_NAME) as conn:
        conn.execute("UPDATE esms SET checksum = ?, size_bytes = ? WHERE id = ?",
                     (checksum, size, esm_id))


def test_rank_lists_flipped_bytes_by_id_and_ranks_the_rest(registry_dir, tiny_encoder):
    clean = _rank(registry_dir, tiny_encoder)
    path = registry_dir / "esms" / IDS[1] / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last weight: still loads, silently wrong
    path.write_bytes(bytes(data))
    r = _rank(registry_dir, tiny_encoder)
    assert "checksum mismatch" in r.errors[IDS[1]]
    assert sorted(x.esm_id for x in r.rows) == sorted([IDS[0], IDS[2]])
    assert {x.esm_id: x.score for x in r.rows} == {
        x.esm_id: x.score for x in clean.rows if x.esm_id != IDS[1]}


def test_rank_lists_nan_weights_by_id_and_ranks_the_rest(registry_dir, tiny_encoder):
    from safetensors.torch import load_file, save_file

    path = registry_dir / "esms" / IDS[2] / "model.safetensors"
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(path))
    _rechecksum(registry_dir, IDS[2])  # as if the NaN had been there when it was added
    r = _rank(registry_dir, tiny_encoder)
    assert "non-finite (NaN or inf) weights" in r.errors[IDS[2]]
    assert sorted(x.esm_id for x in r.rows) == sorted(IDS[:2])


def test_add_refuses_nan_weights(registry_dir, tiny_encoder):
    esm = make_esm("delta", tiny_encoder.identity)
    with torch.no_grad():
        next(iter(esm.parameters())).view(-1)[3] = float("inf")
    with Registry(registry_dir, "w") as reg, pytest.raises(ESMFormatError, match="non-finite"):
        reg.add(esm, esm_id="delta-1", settings_key="k-delta")
    reg = Registry(registry_dir)
    assert "delta-1" not in reg and reg.verify().ok


def test_weights_are_written_with_the_mode_of_every_other_file(registry_dir):
    folder = registry_dir / "esms" / IDS[0]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# -- transfer --source <ESM id>: the config's task_origin is not trusted blindly -------------
def _csv(path, seed):
    texts, labels = make_texts(40, seed=seed)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


@pytest.fixture()
def origin_registry(registry_dir, tmp_path, tiny_encoder):
    """One more ESM whose config records the source file it was built from."""
    source = _csv(tmp_path / "source.csv", seed=1)
    task = load_task(str(source))
    esm = make_esm(task.task_id, tiny_encoder.identity, task_origin=str(source),
                   task_data_hash=task.data_hash())
    with Registry(registry_dir, "w") as reg:
        reg.add(esm, esm_id="source-1", settings_key="k-source")
    return registry_dir, task


def _set_origin(folder, esm_id, origin, *, rechecksum):
    path = folder / "esms" / esm_id / "config.json"
    cfg = json.loads(path.read_text())
    cfg["task_origin"] = str(origin)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if rechecksum:
        _rechecksum(folder, esm_id)


def _choose(folder, tiny_encoder):
    from stepstone.finetune.transfer_source import choose_source

    return choose_source(_target(), "source-1", Registry(folder), encoder=tiny_encoder)


def test_recorded_origin_with_matching_data_is_reloaded(origin_registry, tiny_encoder):
    folder, task = origin_registry
    choice = _choose(folder, tiny_encoder)
    assert choice.esm_id == "source-1" and choice.task.data_hash() == task.data_hash()


def test_edited_config_is_refused_by_its_checksum(origin_registry, tmp_path, tiny_encoder):
    folder, _ = origin_registry
    _set_origin(folder, "source-1", _csv(tmp_path / "other.csv", seed=7), rechecksum=False)
    with pytest.raises(RegistryError, match="checksum mismatch"):
        _choose(folder, tiny_encoder)


def test_origin_with_other_data_is_refused(origin_registry, tmp_path, tiny_encoder):
    folder, _ = origin_registry
    _set_origin(folder, "source-1", _csv(tmp_path / "other.csv", seed=7), rechecksum=True)
    with pytest.raises(DataError, match="changed since ESM 'source-1' was built"):
        _choose(folder, tiny_encoder)


def test_origin_that_is_not_a_data_file_is_never_read(origin_registry, tmp_path,
                                                      tiny_encoder, monkeypatch):
    import stepstone.esm.data as data

    folder, _ = origin_registry
    secret = tmp_path / "secret"
    secret.write_text("text,label\nroot:x:0:0,a\n")
    _set_origin(folder, "source-1", secret, rechecksum=True)
    opened = []
    real = data.load_file
    monkeypatch.setattr(data, "load_file", lambda path, **kw: opened.append(path) or real(
        path, **kw))
    with pytest.raises(DataError, match="not a built-in task, nor a"):
        _choose(folder, tiny_encoder)
    assert not opened


def test_import_refuses_nan_weights(tmp_path):
    from safetensors.torch import save_file

    from stepstone.esm.hfselect import read_hfselect_esm

    folder = tmp_path / "h"
    folder.mkdir()
    w = torch.randn(8, 8)
    w[1, 2] = float("nan")
    save_file({"model.weight": w, "model.bias": torch.zeros(8)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "base_model_name": "bert-base-uncased", "task_id": "imdb",
        "esm_architecture": "linear", "esm_embedding_dim": 8}))
    with pytest.raises(ESMFormatError, match=f"{folder}.*non-finite"):
        read_hfselect_esm(folder)
    assert np.isnan(w.numpy()).any()
