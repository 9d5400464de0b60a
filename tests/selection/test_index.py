import dataclasses

import numpy as np
import pytest

from stepstone.esm.model import ESMConfig, fit_esm
from stepstone.esm.registry import Registry
from stepstone.selection.index import TaskIndex, label_of, task_index


def _add(reg, identity, i, vec):
    X = np.random.default_rng(i).normal(size=(20, identity.dim)).astype(np.float32)
    cfg = ESMConfig(encoder=dataclasses.asdict(identity), task_id=f"t{i}")
    reg.add(fit_esm(X, X, config=cfg)[0], esm_id=f"t{i}", settings_key=f"k{i}", task_vector=vec)


def test_flat_search_equals_brute_force():
    rng = np.random.default_rng(0)
    V = rng.normal(size=(200, 16)).astype(np.float32)
    ids = [f"s{i}" for i in range(200)]
    index = TaskIndex(16)
    index.add(ids, V)
    q = rng.normal(size=16).astype(np.float32)
    Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
    sims = Vn @ (q / np.linalg.norm(q))
    expected = [ids[i] for i in np.argsort(-sims)[:10]]
    got = index.search(q, 10)
    assert [i for i, _ in got] == expected
    np.testing.assert_allclose([s for _, s in got], np.sort(sims)[::-1][:10], rtol=1e-5)
    index.remove(expected[:3])
    assert [i for i, _ in index.search(q, 7)] == expected[3:10]
    with pytest.raises(ValueError, match="dimension 5; the index holds 16"):
        index.search(np.ones(5), 1)


def test_index_follows_registry_changes(tmp_path, tiny_encoder):
    ident = tiny_encoder.identity
    reg = Registry(tmp_path, "w", create=True)
    vecs = np.eye(32, dtype=np.float32)
    for i in range(3):
        _add(reg, ident, i, vecs[i])
    index = task_index(reg)
    assert len(index) == 3 and (tmp_path / "index.faiss").exists()
    assert index.search(vecs[1], 1)[0][0] == "t1"
    reg.remove("t1")
    _add(reg, ident, 5, vecs[5])
    updated = task_index(reg)
    assert updated.generation == reg.generation
    assert sorted(updated.ids.values()) == ["t0", "t2", "t5"]
    assert updated.search(vecs[5], 1)[0][0] == "t5"
    assert label_of("t5") in updated.ids
    # a corrupt index file is derived data: it is rebuilt, not trusted
    (tmp_path / "index.faiss").write_bytes(b"garbage")
    assert sorted(task_index(reg).ids.values()) == ["t0", "t2", "t5"]
    assert reg.verify().ok
