import dataclasses
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stepstone.esm.encoder import EncoderMismatchError
from stepstone.esm.hfselect import import_hfselect
from stepstone.esm.model import ESMConfig, fit_esm
from stepstone.esm.registry import Registry, RegistryError


def _esm(task_id, identity, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(50, identity.dim)).astype(np.float32)
    cfg = ESMConfig(encoder=dataclasses.asdict(identity), task_id=task_id, classes=["a", "b"])
    return fit_esm(X, X * 2 + 1, config=cfg)[0]


def test_add_list_show_verify_remove(tmp_path, tiny_encoder):
    reg = Registry(tmp_path / "reg", "w", create=True)
    ident = tiny_encoder.identity
    e1 = reg.add(_esm("t1", ident), esm_id="t1-x", settings_key="k1",
                 task_vector=np.ones(32), profile={"token_counts": {"good": 3}})
    reg.add(_esm("t2", ident, 1), esm_id="t2-x", settings_key="k2")
    assert [e.id for e in reg.entries()] == ["t1-x", "t2-x"]
    assert reg.find("k1") == e1 and reg.find("nope") is None
    assert reg.get("t1-x").task_vector.shape == (32,)
    assert reg.profile("t1-x") == {"token_counts": {"good": 3}}
    assert reg.verify().ok
    x = np.ones((2, 32), np.float32)
    np.testing.assert_allclose(reg.load_esm("t1-x", encoder=ident).transform(x),
                               _esm("t1", ident).transform(x), rtol=1e-6)
    with pytest.raises(RegistryError, match="already in the registry"):
        reg.add(_esm("t1", ident), esm_id="t1-x", settings_key="k1")
    reg.remove("t1-x")
    assert len(reg) == 1 and not (tmp_path / "reg" / "esms" / "t1-x").exists()
    with pytest.raises(RegistryError, match="No ESM 't1-x'"):
        reg.get("t1-x")
    ro = Registry(tmp_path / "reg")
    assert len(ro) == 1
    with pytest.raises(RegistryError, match="read-only"):
        ro.remove("t2-x")


def test_verify_finds_tampering_and_strays(tmp_path, tiny_encoder):
    reg = Registry(tmp_path, "w", create=True)
    reg.add(_esm("t1", tiny_encoder.identity), esm_id="t1-x", settings_key="k1")
    (tmp_path / "esms" / "t1-x" / "config.json").write_text("{}")
    (tmp_path / "esms" / "stray").mkdir()
    report = Registry(tmp_path).verify()
    assert not report.ok
    text = str(report)
    assert "t1-x: checksum mismatch" in text and "esms/stray: folder without row" in text


def test_corrupt_or_missing_registry(tmp_path):
    with pytest.raises(RegistryError, match="No registry at"):
        Registry(tmp_path / "none")
    (tmp_path / "registry.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(RegistryError, match="not a readable stepstone registry"):
        Registry(tmp_path)


def test_encoder_check_names_both(tmp_path, tiny_model_dir):
    from stepstone.esm.encoder import load_encoder

    reg = Registry(tmp_path, "w", create=True)
    reg.add(_esm("t1", load_encoder(str(tiny_model_dir)).identity), esm_id="a", settings_key="k")
    cls = load_encoder(str(tiny_model_dir), pooling="cls").identity
    with pytest.raises(EncoderMismatchError, match="built for .* mean.*asked for is .* cls"):
        reg.check_encoder(cls)


KILL_SCRIPT = """
import dataclasses, os, sys
import numpy as np
from stepstone.esm.encoder import load_encoder
from stepstone.esm.model import ESMConfig, fit_esm
from stepstone.esm import registry as R
enc = load_encoder(sys.argv[1])
X = np.random.default_rng(0).normal(size=(30, enc.dim)).astype(np.float32)
esm = fit_esm(X, X, config=ESMConfig(encoder=dataclasses.asdict(enc.identity), task_id="t"))[0]
where = sys.argv[3]
real_rename, real_fsync = os.rename, R.fsync_tree
def rename(a, b):
    real_rename(a, b)
    if where == "after-rename":
        os._exit(9)
def fsync(folder):
    real_fsync(folder)
    if where == "staged":
        os._exit(9)
R.os.rename, R.fsync_tree = rename, fsync
reg = R.Registry(sys.argv[2], "w", create=True)
reg.add(esm, esm_id="t-1", settings_key="k")
"""


@pytest.mark.heavy  # kills, resumes or several runs: `make test`, not test-fast
@pytest.mark.parametrize("where,survives", [("staged", False), ("after-rename", True)])
def test_killed_add_leaves_a_registry_that_verifies(tmp_path, tiny_model_dir, where, survives):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir),
                           str(tmp_path / "reg"), where], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    reg = Registry(tmp_path / "reg", "w")  # opening for writing recovers
    report = reg.verify()
    assert report.ok, str(report)
    assert ("t-1" in reg) is survives
    assert not (tmp_path / "reg" / ".staging").exists()
    with sqlite3.connect(tmp_path / "reg" / "registry.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0


def test_import_hfselect_into_registry(tmp_path):
    from tests.esm.test_model import _write_hfselect

    _write_hfselect(tmp_path / "h", legacy=True)
    reg = Registry(tmp_path / "reg", "w", create=True)
    entry = import_hfselect(reg, tmp_path / "h")
    assert entry.task_id == "imdb" and entry.base_model == "bert-base-uncased"
    assert import_hfselect(reg, tmp_path / "h") is None  # idempotent
    assert reg.verify().ok
