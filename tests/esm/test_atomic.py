"""Atomic writes: whole or absent, and a failed write leaves the old content."""

from __future__ import annotations

import json

import pytest

from stepstone.esm.atomic import append_line, atomic_path, write_text_atomic


def test_file_is_replaced_whole(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_text_atomic(path, json.dumps({"v": 1}))
    write_text_atomic(path, json.dumps({"v": 2}))
    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_folder_is_swapped_in_and_the_old_one_removed(tmp_path):
    dest = tmp_path / "ckpt"
    for version in ("1", "2"):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "state.json").write_text(version)
    assert (dest / "state.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_stale_temporary_is_cleared_first(tmp_path):
    dest = tmp_path / "esm"
    (tmp_path / "esm.tmp").mkdir()
    (tmp_path / "esm.tmp" / "junk").write_text("x")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"]


def test_append_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_line(path, "a")
    append_line(path, "b")
    assert path.read_text() == "a\nb\n"
