"""Bad registries through the CLI: each case names its fault, the command, the exit code,
fragments the message must hold, and the paths that must survive (issue 19)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stepstone.cli import main
from stepstone.esm.registry import (
    DB_NAME,
    Registry,
    RegistryError,
    check_esm_id,
    repair_registry,
)
from tests.faults.conftest import TASKS, key_of, snapshot

IDS = [f"{t}-{key_of(t)[:8]}" for t in TASKS]
ESM_FOLDERS = [f"box/reg/esms/{i}/model.safetensors" for i in IDS]


def truncate_manifest(reg: Path, tmp: Path) -> None:
    (reg / DB_NAME).write_bytes(b"")


def delete_manifest(reg: Path, tmp: Path) -> None:
    (reg / DB_NAME).unlink()


def garbage_manifest(reg: Path, tmp: Path) -> None:
    (reg / DB_NAME).write_bytes(b"not sqlite at all " * 100)


def stray_folder(reg: Path, tmp: Path) -> None:
    (reg / "esms" / "my_notes").mkdir()
    (reg / "esms" / "my_notes" / "todo.txt").write_text("keep me")


def stray_model_folder(reg: Path, tmp: Path) -> None:
    (reg / "models" / "orphan").mkdir(parents=True)
    (reg / "models" / "orphan" / "weights.bin").write_bytes(b"\0")


def traversal_row(reg: Path, tmp: Path) -> None:
    victim = tmp / "box" / "victim"  # reg/esms/../../victim
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "config.json").write_text("{}")
    with sqlite3.connect(reg / DB_NAME) as conn:
        row = list(conn.execute("SELECT * FROM esms LIMIT 1").fetchone())
        row[0], row[13] = "../../victim", "evil"
        conn.execute(f"INSERT INTO esms VALUES ({', '.join('?' * len(row))})", row)


def flip_weight_bytes(reg: Path, tmp: Path) -> None:
    path = reg / "esms" / IDS[1] / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def hfselect_folder(tmp: Path, *, nan: bool = False, config=None) -> Path:
    folder = tmp / ("nan" if nan else "bad-config")
    folder.mkdir()
    w = torch.randn(8, 8)
    if nan:
        w[0, 0] = float("nan")
    save_file({"model.weight": w, "model.bias": torch.zeros(8)},
              str(folder / "model.safetensors"))
    cfg = config if config is not None else {
        "base_model_name": "bert-base-uncased", "task_id": "imdb", "esm_architecture": "linear",
        "esm_embedding_dim": 8}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def nan_hfselect(reg: Path, tmp: Path) -> None:
    hfselect_folder(tmp, nan=True)


def list_config_hfselect(reg: Path, tmp: Path) -> None:
    hfselect_folder(tmp, config=[1, 2, 3])


R = "{reg}"
CASES = [
    # (name, setup, argv, exit code, fragments, must survive, changes nothing)
    ("0-byte manifest, verify", truncate_manifest, ["registry", "verify", "--registry", R], 2,
     ["empty (0 bytes)", "3 ESM/model folder(s)", "registry repair --registry"],
     ESM_FOLDERS, True),
    ("0-byte manifest, list", truncate_manifest, ["registry", "list", "--registry", R], 2,
     ["empty (0 bytes)", "registry repair"], ESM_FOLDERS, True),
    ("0-byte manifest, remove", truncate_manifest,
     ["registry", "remove", "--registry", R, IDS[0]], 2, ["empty (0 bytes)", "repair"],
     ESM_FOLDERS, False),
    ("missing manifest, verify", delete_manifest, ["registry", "verify", "--registry", R], 2,
     ["missing", "Nothing was changed", "registry repair"], ESM_FOLDERS, True),
    ("missing manifest, build", delete_manifest,
     ["registry", "build", "--registry", R, "--sources", "{tmp}/src.csv", "--encoder",
      "{tiny}", "--quiet"], 2, ["missing", "registry repair"], ESM_FOLDERS, False),
    ("garbage manifest, verify", garbage_manifest, ["registry", "verify", "--registry", R], 2,
     ["not a readable stepstone registry database", "move it aside"], ESM_FOLDERS, True),
    ("stray folder, list", stray_folder, ["registry", "list", "--registry", R], 0,
     ["3 ESMs"], ["box/reg/esms/my_notes/todo.txt"], True),
    ("stray folder, verify", stray_folder, ["registry", "verify", "--registry", R], 1,
     ["esms/my_notes: folder without row (left alone"], ["box/reg/esms/my_notes/todo.txt"],
     True),
    ("stray folder, remove another id", stray_folder,
     ["registry", "remove", "--registry", R, IDS[0]], 0, [f"removed 1: {IDS[0]}"],
     ["box/reg/esms/my_notes/todo.txt", ESM_FOLDERS[1]], False),
    ("model folder without row, verify", stray_model_folder,
     ["registry", "verify", "--registry", R], 1, ["models/orphan: folder without row"],
     ["box/reg/models/orphan/weights.bin"], True),
    ("path-traversal id, remove", traversal_row,
     ["registry", "remove", "--registry", R, "../../victim"], 2,
     ["'../../victim' is not a valid ESM id"], ["box/victim/precious.txt", *ESM_FOLDERS], False),
    ("path-traversal id, verify", traversal_row, ["registry", "verify", "--registry", R], 1,
     ["row with unsafe id '../../victim'"], ["box/victim/precious.txt"], True),
    ("path-traversal id, list", traversal_row, ["registry", "list", "--registry", R], 0,
     ["3 ESMs"], ["box/victim/precious.txt"], True),
    ("flipped weight bytes, verify", flip_weight_bytes,
     ["registry", "verify", "--registry", R], 1, [f"{IDS[1]}: checksum mismatch"],
     ESM_FOLDERS, True),
    ("NaN weights, import-hfselect", nan_hfselect,
     ["registry", "import-hfselect", "--registry", R, "{tmp}/nan"], 1,
     ["failed", "non-finite (NaN or inf) weights"], ESM_FOLDERS, False),
    ("config a JSON list, import-hfselect", list_config_hfselect,
     ["registry", "import-hfselect", "--registry", R, "{tmp}/bad-config"], 1,
     ["config.json must hold a JSON object; got a list"], ESM_FOLDERS, False),
    ("no registry, list", lambda reg, tmp: None,
     ["registry", "list", "--registry", "{tmp}/none"], 2, ["No registry at"], [], True),
]


@pytest.mark.parametrize("name,setup,argv,code,fragments,survive,readonly", CASES,
                         ids=[c[0] for c in CASES])
def test_fault_table(name, setup, argv, code, fragments, survive, readonly, registry_dir,
                     tmp_path, tiny_model_dir, capsys):
    setup(registry_dir, tmp_path)
    before = snapshot(tmp_path / "box")
    args = [a.format(reg=registry_dir, tmp=tmp_path, tiny=tiny_model_dir) for a in argv]
    assert main(args) == code
    out = capsys.readouterr()
    text = out.out + out.err
    for fragment in fragments:
        assert fragment in text, text
    for rel in survive:
        assert (tmp_path / rel).exists(), f"{rel} vanished"
    if readonly:
        assert snapshot(tmp_path / "box") == before, "a read-only command changed the registry"


def test_reader_writes_nothing(registry_dir, tmp_path, tiny_encoder):
    stray_folder(registry_dir, tmp_path)
    stray_model_folder(registry_dir, tmp_path)
    before = snapshot(tmp_path / "box")
    reg = Registry(registry_dir)
    assert len(reg) == 3 and not reg.verify().ok
    reg.load_esm(IDS[0], encoder=tiny_encoder.identity)
    reg.profile(IDS[0])
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reg.conn.execute("INSERT INTO meta VALUES ('x', 'y')")
    with pytest.raises(RegistryError, match="read-only"):
        reg.remove(IDS[0])
    reg.close()
    assert snapshot(tmp_path / "box") == before


def test_writer_recovers_only_its_own(registry_dir, tmp_path):
    """A writer opening finishes recorded operations only; unknown things stay."""
    stray_folder(registry_dir, tmp_path)
    stray_model_folder(registry_dir, tmp_path)
    (registry_dir / ".staging" / "someone-else").mkdir(parents=True)
    with Registry(registry_dir, "w") as reg:
        assert len(reg) == 3
    for rel in ("esms/my_notes/todo.txt", "models/orphan/weights.bin", ".staging/someone-else"):
        assert (registry_dir / rel).exists(), rel
    problems = str(Registry(registry_dir).verify())
    assert ".staging/someone-else: not a pending addition (left alone)" in problems


def test_repair_rebuilds_a_lost_manifest(registry_dir, tmp_path, capsys):
    rows = {e.id: e for e in Registry(registry_dir).entries()}
    truncate_manifest(registry_dir, tmp_path)
    stray_folder(registry_dir, tmp_path)
    bad = registry_dir / "esms" / "broken-1"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2]")
    assert main(["registry", "repair", "--registry", str(registry_dir)]) == 1  # refusals
    text = capsys.readouterr().out
    assert "created a new registry.sqlite" in text and "added 3 row(s)" in text
    assert "refused esms/broken-1: unreadable ESM" in text
    assert "refused esms/my_notes: no config.json: not an ESM folder" in text
    assert bad.exists() and (registry_dir / "esms" / "my_notes" / "todo.txt").exists()
    reg = Registry(registry_dir)
    assert sorted(e.id for e in reg.entries()) == sorted(rows)
    for e in reg.entries():
        assert e.checksum == rows[e.id].checksum and e.task_id == rows[e.id].task_id
    # a rerun of the build finds the rebuilt rows by the key in their ids
    assert reg.find(key_of("alpha")).id == IDS[0]
    # verify --repair is the same command; a second run has nothing left to add
    assert main(["registry", "verify", "--repair", "--registry", str(registry_dir)]) == 1
    assert "added" not in capsys.readouterr().out


def test_repair_drops_unsafe_rows_only(registry_dir, tmp_path):
    traversal_row(registry_dir, tmp_path)
    report = repair_registry(registry_dir)
    assert report.removed_rows == ["../../victim"] and not report.remaining
    assert (tmp_path / "box" / "victim" / "precious.txt").exists()
    assert Registry(registry_dir).verify().ok


def test_symlink_leaving_the_registry_is_refused(registry_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    folder = registry_dir / "esms" / IDS[2]
    folder.rename(tmp_path / "moved")
    folder.symlink_to(outside, target_is_directory=True)
    assert "outside the registry's esms/ folder" in str(Registry(registry_dir).verify())
    with pytest.raises(RegistryError, match="outside"):
        Registry(registry_dir, "w").remove(IDS[2])
    assert (outside / "keep.txt").exists()


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "", "a..b", "x" * 300, "é", "-a",
                                 "a\0b", None])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(RegistryError, match="not a valid ESM id"):
        check_esm_id(bad)
