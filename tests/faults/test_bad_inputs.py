"""Bad input files, labels and caches through the CLI (issue 19, "Labels and files").

Each case names its fault, writes a small file under ``tmp_path``, runs one command and
states the exit code and the fragments its output (stdout, stderr and the log) must
hold: the file, the line or row, and the fix. Every case failed on the code before
issue 19 (a traceback, a message without the file or row, or a silently wrong task).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from stepstone.cli import main
from stepstone.esm import cache as cache_module
from tests.conftest import make_texts


# -- files ----------------------------------------------------------------------------------
def _frame(n: int = 40, seed: int = 0, **columns) -> pd.DataFrame:
    texts, labels = make_texts(n, seed=seed)
    return pd.DataFrame({"text": texts, "label": labels, **columns})


def good_csv(tmp: Path) -> None:
    _frame().to_csv(tmp / "good.csv", index=False)


def whitespace_labels(tmp: Path) -> None:
    df = _frame()
    df.loc[::4, "label"] = df.loc[::4, "label"] + " "  # 'pos ' beside 'pos'
    df.to_csv(tmp / "data.csv", index=False)


def conflicting_duplicates(tmp: Path) -> None:
    df = _frame()
    dup = df.iloc[:20].copy()
    dup["label"] = dup["label"].map({"pos": "neg", "neg": "pos"})
    pd.concat([df, dup]).to_csv(tmp / "data.csv", index=False)


def stray_word_in_numbers(tmp: Path) -> None:
    df = _frame()
    df["label"] = [round(0.37 * i % 5, 2) for i in range(len(df))]
    df["label"] = df["label"].astype(object)
    df.loc[7, "label"] = "high"  # data row 8
    df.to_csv(tmp / "data.csv", index=False)


def half_steps(tmp: Path) -> None:
    df = _frame()
    df["label"] = [0.5 if lab == "pos" else 1.5 for lab in df["label"]]
    df.to_csv(tmp / "data.csv", index=False)


def whole_numbers(tmp: Path) -> None:
    df = _frame()
    df["label"] = [1 if lab == "pos" else 0 for lab in df["label"]]
    df.to_csv(tmp / "data.csv", index=False)


def na_label(tmp: Path) -> None:
    text = _frame().to_csv(index=False).splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ",NA"  # data row 5
    (tmp / "data.csv").write_text("\n".join(text) + "\n")


def latin1(tmp: Path) -> None:
    text = _frame().to_csv(index=False).splitlines()
    text[3] = "caf\u00e9 " + text[3]  # line 4
    (tmp / "data.csv").write_bytes(("\n".join(text) + "\n").encode("latin-1"))


def jsonl_bad_line(tmp: Path) -> None:
    lines = _frame().to_json(orient="records", lines=True).splitlines()
    lines[6] = lines[6][:-3]  # line 7 cut short
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")


def json_broken(tmp: Path) -> None:
    text = _frame().to_json(orient="records", indent=1)
    (tmp / "data.json").write_text(text.replace('"label":', '"label"', 1))


def empty_csv(tmp: Path) -> None:
    (tmp / "data.csv").write_bytes(b"")


def empty_jsonl(tmp: Path) -> None:
    (tmp / "data.jsonl").write_bytes(b"")


def header_only(tmp: Path) -> None:
    (tmp / "data.csv").write_text("text,label\n")


def folder_named_csv(tmp: Path) -> None:
    (tmp / "data.csv").mkdir()


def numeric_text_column(tmp: Path) -> None:
    df = _frame()
    df["text"] = range(len(df))
    df["sentence"] = _frame()["text"]
    df.to_csv(tmp / "data.csv", index=False)


def ragged_csv(tmp: Path) -> None:
    text = _frame().to_csv(index=False).splitlines()
    text[9] += ",extra"  # line 10 has three fields
    (tmp / "data.csv").write_text("\n".join(text) + "\n")


def garbage_parquet(tmp: Path) -> None:
    (tmp / "data.parquet").write_bytes(b"PAR1 this is not parquet" * 10)


def folder_among_sources(tmp: Path) -> None:
    good_csv(tmp)
    (tmp / "dir.csv").mkdir()


# -- caches ---------------------------------------------------------------------------------
def corrupt_cache(tmp: Path) -> None:
    good_csv(tmp)
    (tmp / "cache").mkdir()
    (tmp / "cache" / cache_module.CACHE_FILE).write_bytes(b"not a database at all " * 200)


def cache_is_a_file(tmp: Path) -> None:
    good_csv(tmp)
    (tmp / "cache").write_text("a file where the cache folder should be")


def locked_cache(tmp: Path):
    """An exclusive lock held by another connection for as long as the command runs."""
    good_csv(tmp)
    (tmp / "cache").mkdir()
    conn = sqlite3.connect(tmp / "cache" / cache_module.CACHE_FILE, isolation_level=None)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("BEGIN EXCLUSIVE")
    return conn.close


RANK = ["rank", "{tmp}/data.csv", "--registry", "{reg}", "--encoder", "{tiny}",
        "--max-length", "32", "--quiet", "--no-cache"]
RANK_CACHED = [a for a in RANK if a != "--no-cache"]
BUILD = ["registry", "build", "--registry", "{tmp}/new-reg", "--encoder", "{tiny}",
         "--max-examples", "30", "--ft-epochs", "1", "--quiet"]


def _on(argv, path):
    return [path if a == "{tmp}/data.csv" else a for a in argv]


CASES = [
    # (name, setup, argv, exit code, fragments of stdout + stderr + log)
    # labels
    ("label whitespace", whitespace_labels, RANK, 0,
     ["stripped surrounding whitespace from 10 of 40 values of label column 'label'",
      "'pos ' -> 'pos'", "target labels: classification, 2 classes"]),
    ("conflicting duplicate texts", conflicting_duplicates, RANK, 2,
     ["data.csv", "20 texts appear more than once with different labels",
      "first:", "data row 1", "data row 41", "--on-conflict drop"]),
    ("conflicting duplicate texts, dropped", conflicting_duplicates,
     [*RANK, "--on-conflict", "drop"], 0,
     ["dropped the 40 rows of 20 texts", "target labels: classification, 2 classes"]),
    ("one word in a numeric label column", stray_word_in_numbers, RANK, 2,
     ["data.csv", "mix 39 numbers with 1 non-numeric value", "'high' at data row 8",
      "--label-kind"]),
    ("one word in a numeric column, --label-kind regression", stray_word_in_numbers,
     [*RANK, "--label-kind", "regression"], 2,
     ["data.csv", "regression labels must be numeric", "'high' at data row 8",
      "--drop-invalid"]),
    ("one word in a numeric column, dropped", stray_word_in_numbers,
     [*RANK, "--label-kind", "regression", "--drop-invalid"], 0,
     ["dropping 1 row", "target labels: regression (given"]),
    ("labels 0.5 and 1.5", half_steps, RANK, 0,
     ["only 2 distinct values (0.5, 1.5)", "--label-kind classification",
      "target labels: regression (inferred: the labels are numbers"]),
    ("whole-number labels, --json", whole_numbers, [*RANK, "--json"], 0,
     ['"target_labels"', '"kind": "classification"', '"num_classes": 2',
      "every label is a whole number"]),
    ("NA as a label", na_label, RANK, 2,
     ["data.csv", "1 with a missing label", "data row 5", "NA-like", "--drop-invalid"]),
    # files
    ("latin-1 file", latin1, RANK, 2,
     ["data.csv, line 4", "byte 0xe9 is not valid utf-8", "--encoding latin-1"]),
    ("latin-1 file, --encoding latin-1", latin1, [*RANK, "--encoding", "latin-1"], 0,
     ["Ranking of 3 sources"]),
    ("unknown --encoding", good_csv, [*_on(RANK, "{tmp}/good.csv"), "--encoding", "latin-9x"],
     2, ["'encoding' must be a text encoding", "'latin-9x'"]),
    ("JSONL with a bad line", jsonl_bad_line, _on(RANK, "{tmp}/data.jsonl"), 2,
     ["data.jsonl, line 7: not valid JSON", "one JSON object per line"]),
    ("JSON with a syntax error", json_broken, _on(RANK, "{tmp}/data.json"), 2,
     ["data.json, line 4: not valid JSON"]),
    ("empty CSV", empty_csv, RANK, 2, ["data.csv is empty (0 bytes)"]),
    ("empty JSONL", empty_jsonl, _on(RANK, "{tmp}/data.jsonl"), 2,
     ["data.jsonl is empty (0 bytes)"]),
    ("header-only CSV", header_only, RANK, 2, ["data.csv", "no data rows"]),
    ("folder named data.csv", folder_named_csv, RANK, 2,
     ["data.csv is a folder, not a data file"]),
    ("all-numeric text column", numeric_text_column, RANK, 2,
     ["data.csv", "text column 'text' holds no text", "int values", "--text-column",
      "'sentence'"]),
    ("ragged CSV line", ragged_csv, RANK, 2,
     ["data.csv is not a valid CSV file", "line 10"]),
    ("garbage Parquet", garbage_parquet, _on(RANK, "{tmp}/data.parquet"), 2,
     ["data.parquet is not a readable Parquet file"]),
    ("folder among build sources", folder_among_sources,
     [*BUILD, "--no-cache", "--sources", "{tmp}/good.csv", "{tmp}/dir.csv"], 1,
     ["added 1", "failed 1", "dir.csv is a folder, not a data file",
      "good.csv: classification, 2 classes (inferred"]),
    # the embedding cache
    ("corrupt embedding cache, rank", corrupt_cache, _on(RANK_CACHED, "{tmp}/good.csv"), 0,
     ["cache/embeddings.sqlite is corrupt", "rebuilt empty", "--no-cache",
      "Ranking of 3 sources"]),
    ("corrupt embedding cache, build", corrupt_cache,
     [*BUILD, "--cache-dir", "{tmp}/cache", "--sources", "{tmp}/good.csv"], 0,
     ["cache/embeddings.sqlite is corrupt", "rebuilt empty", "added 1"]),
    ("cache folder is a file", cache_is_a_file, _on(RANK_CACHED, "{tmp}/good.csv"), 2,
     ["embedding cache folder", "/cache", "--no-cache"]),
    ("locked embedding cache", locked_cache, _on(RANK_CACHED, "{tmp}/good.csv"), 0,
     ["cache/embeddings.sqlite is locked", "without it", "Ranking of 3 sources"]),
]


@pytest.mark.parametrize("name,setup,argv,code,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(name, setup, argv, code, fragments, registry_dir, tmp_path,
                         tiny_model_dir, capsys, caplog, monkeypatch):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(cache_module, "LOCK_TIMEOUT", 0.2)
    cleanup = setup(tmp_path)
    args = [a.format(reg=registry_dir, tmp=tmp_path, tiny=tiny_model_dir) for a in argv]
    try:
        with caplog.at_level(logging.WARNING):
            got = main(args)
    finally:
        if cleanup is not None:
            cleanup()
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert got == code, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    if "--json" in args and code == 0:
        labels = json.loads(out.out)["target_labels"]
        assert labels["kind"] == "classification" and labels["num_classes"] == 2


# -- the embedding cache through its API ----------------------------------------------------
KEY = "enc-key"


def _vectors(n=4, dim=8):
    import numpy as np

    digests = [bytes([i]) * 32 for i in range(n)]
    return digests, np.arange(n * dim, dtype=np.float32).reshape(n, dim)


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    from stepstone.esm.cache import EmbeddingCache

    (tmp_path / cache_module.CACHE_FILE).write_bytes(b"garbage" * 1000)
    (tmp_path / (cache_module.CACHE_FILE + "-wal")).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        cache = EmbeddingCache(tmp_path)
    assert f"{tmp_path / cache_module.CACHE_FILE} is corrupt" in caplog.text
    digests, vectors = _vectors()
    cache.put(KEY, digests, vectors)
    assert len(cache) == 4 and set(cache.get(KEY, digests, 8)) == set(digests)
    cache.close()


def test_damage_found_while_reading_rebuilds_the_cache(tmp_path, caplog):
    from stepstone.esm.cache import EmbeddingCache

    digests, vectors = _vectors(200, 64)
    cache = EmbeddingCache(tmp_path)
    cache.put(KEY, digests, vectors)
    cache.close()  # checkpoints the WAL into the file
    path = tmp_path / cache_module.CACHE_FILE
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)  # every page after the first
    path.write_bytes(bytes(data))
    cache = EmbeddingCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.get(KEY, digests, 64) == {}
    assert "is corrupt" in caplog.text and "rebuilt empty" in caplog.text
    cache.put(KEY, digests[:3], vectors[:3])
    assert len(cache.get(KEY, digests, 64)) == 3
    cache.close()


def test_a_foreign_table_is_rebuilt(tmp_path, caplog):
    from stepstone.esm.cache import EmbeddingCache

    with sqlite3.connect(tmp_path / cache_module.CACHE_FILE) as conn:
        conn.execute("CREATE TABLE embeddings (a, b)")
    with caplog.at_level(logging.WARNING):
        cache = EmbeddingCache(tmp_path)
    assert "has the columns ['a', 'b']" in caplog.text
    assert len(cache) == 0
    cache.close()


def test_a_write_lock_held_elsewhere_skips_the_cache(tmp_path, caplog):
    from stepstone.esm.cache import EmbeddingCache

    digests, vectors = _vectors()
    cache = EmbeddingCache(tmp_path, timeout=0.1)
    cache.put(KEY, digests[:2], vectors[:2])
    other = sqlite3.connect(tmp_path / cache_module.CACHE_FILE, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert len(cache.get(KEY, digests, 8)) == 2  # WAL: reading is not blocked
        with caplog.at_level(logging.WARNING):
            cache.put(KEY, digests[2:], vectors[2:])  # does not raise
        assert "is locked by another process" in caplog.text and not cache.active
        assert cache.get(KEY, digests, 8) == {}
    finally:
        other.close()
    assert len(EmbeddingCache(tmp_path)) == 2


def test_a_cache_folder_that_is_a_file_names_the_path(tmp_path):
    from stepstone.esm.cache import CacheError, EmbeddingCache

    (tmp_path / "c").write_text("x")
    with pytest.raises(CacheError, match=r"c': it is a file, not a folder\. Pass --no-cache"):
        EmbeddingCache(tmp_path / "c")
