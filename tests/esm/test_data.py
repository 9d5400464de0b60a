import logging

import numpy as np
import pandas as pd
import pytest

from stepstone.esm.data import (
    RULE_GIVEN,
    RULE_REAL,
    RULE_TEXT,
    RULE_WHOLE,
    DataError,
    infer_label_kind,
    load_file,
    load_hub,
    make_task,
    normalize_text,
    read_table,
)
from stepstone.esm.errors import ConfigError
from stepstone.esm.specs import load_task


def test_split_is_disjoint_deduplicated_and_seeded():
    texts = [f"text {i % 50}" for i in range(100)]  # every text twice
    labels = ["a" if i % 50 < 25 else "b" for i in range(100)]
    t1 = make_task("t", texts, labels, seed=3)
    t2 = make_task("t", texts, labels, seed=3)
    assert len(t1.train) + len(t1.test) == 50
    train = {normalize_text(x) for x in t1.train.texts}
    test = {normalize_text(x) for x in t1.test.texts}
    assert not train & test
    assert t1.data_hash() == t2.data_hash()
    assert t1.data_hash() != make_task("t", texts, labels, seed=4).data_hash()
    assert t1.classes == ("a", "b")
    assert set(np.unique(t1.test.labels)) == {0, 1}  # stratified


def test_label_kinds_and_types():
    texts = [f"x{i}" for i in range(20)]
    assert make_task("t", texts, [i % 3 for i in range(20)]).classes == ("0", "1", "2")
    reg = make_task("t", texts, [i / 7 for i in range(20)])
    assert reg.label_kind == "regression" and reg.train.labels.dtype == np.float64
    with pytest.raises(DataError, match="regression labels must be numeric; 1 are not"):
        make_task("t", texts, [*range(19), "high"], label_kind="regression")


def test_bad_input_messages():
    with pytest.raises(DataError, match="empty"):
        make_task("t", [], [])
    with pytest.raises(DataError, match="at least 2 classes; every label is 'a'"):
        make_task("t", ["x", "y", "z"], ["a", "a", "a"])
    with pytest.raises(DataError, match=r"of 4 rows, 1 with a missing or empty text \(first: "
                                        r"data row 2\); 2 with a missing label"):
        make_task("t", ["x", "", "z", "w"], ["a", float("nan"), None, "b"])
    task = make_task("t", ["x", "", "z", "w", "v"], ["a", "b", None, "b", "a"],
                     drop_invalid=True)
    assert len(task.train) + len(task.test) == 3


def test_exclude_texts_and_given_test_split():
    task = make_task("t", ["a b", "c d", "e f", "g h"], [0, 1, 0, 1],
                     exclude_texts=frozenset({"a b"}), test_texts=["c  D", "x"],
                     test_labels=[1, 0])
    assert "a b" not in task.train.texts and "c d" not in task.train.texts
    assert task.test.texts == ("c  D", "x")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix):
    df = pd.DataFrame({"sentence": [f"s {i}" for i in range(30)],
                       "other": [f"o {i}" for i in range(30)],
                       "y": ["pos", "neg"] * 15})
    path = tmp_path / f"data{suffix}"
    writer = {".csv": lambda: df.to_csv(path, index=False),
              ".tsv": lambda: df.to_csv(path, sep="\t", index=False),
              ".json": lambda: df.to_json(path, orient="records"),
              ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
              ".parquet": lambda: df.to_parquet(path)}[suffix]
    writer()
    task = load_task(str(path), text_column="sentence", label_column="y")
    assert task.task_id == "data" and len(task.train) + len(task.test) == 30
    pair = load_file(path, text_column=["sentence", "other"], label_column="y")
    assert pair.is_pair and pair.train.inputs()[0][1].startswith("o ")
    with pytest.raises(DataError, match=r"\['text'\] not found .* columns are \['sentence', "
                                        r"'other', 'y'\]"):
        load_file(path, label_column="y")


def test_missing_file_and_subsample(tmp_path, small_task):
    with pytest.raises(DataError, match="No such data file"):
        load_task(str(tmp_path / "nope.csv"))
    small = small_task.subsample(max_train=10, seed=1)
    assert len(small.train) == 10
    assert set(np.unique(small.train.labels)) == {0, 1}


def test_exclusions_that_leave_one_class_are_refused():
    with pytest.raises(DataError, match=r"only the class\(es\) \['a'\]"):
        make_task("x", ["a1", "a2", "a3", "b1", "b2"], list("aaabb"),
                  exclude_texts=frozenset({"b1", "b2"}))
    with pytest.raises(DataError, match="missing"):
        make_task("x", ["a", "b", "c"], [np.float32("nan"), "p", "q"])


def test_unreachable_hub_name_is_a_clear_error():
    with pytest.raises(DataError, match="not 'builtin:ID', not an existing .*Hub dataset"):
        load_task("nobody-here/no-such-dataset")


# -- labels (issue 19) ----------------------------------------------------------------------
TEXTS = [f"text number {i}" for i in range(20)]


def test_label_whitespace_is_stripped_and_said(caplog):
    labels = ["pos" if i % 2 else "neg" for i in range(20)]
    labels[1], labels[2] = "pos ", " neg\t"
    with caplog.at_level(logging.WARNING):
        task = make_task("t", TEXTS, labels)
    assert task.classes == ("neg", "pos")
    assert "stripped surrounding whitespace from 2 of 20 values of the labels" in caplog.text


def test_the_label_kind_rule_is_explicit_and_recorded():
    assert make_task("t", TEXTS, ["a", "b"] * 10).label_info() == {
        "kind": "classification", "num_classes": 2, "rule": RULE_TEXT}
    whole = make_task("t", TEXTS, [i % 3 for i in range(20)])
    assert whole.label_rule == RULE_WHOLE and whole.label_summary().startswith(
        "classification, 3 classes (inferred:")
    assert make_task("t", TEXTS, [i / 7 for i in range(20)]).label_rule == RULE_REAL
    given = make_task("t", TEXTS, [i % 2 for i in range(20)], label_kind="regression")
    assert given.label_info() == {"kind": "regression", "num_classes": 0, "rule": RULE_GIVEN}
    assert given.subsample(max_train=5).label_rule == RULE_GIVEN
    # numeric strings count as numbers; booleans do not
    assert infer_label_kind(["0.5", "1.5", 2]) == "regression"
    assert infer_label_kind([True, False]) == "classification"
    with pytest.raises(DataError, match=r"mix 2 numbers with 1 non-numeric"):
        infer_label_kind([0.5, 1.5, "high"])


def test_a_stray_word_in_numeric_labels_is_refused_not_made_a_class():
    labels: list[object] = [(i % 5) / 2 for i in range(20)]
    labels[5] = "high"
    with pytest.raises(DataError, match=r"mix 19 numbers with 1 non-numeric value \(e\.g\. "
                                        r"'high' at data row 6\).*--label-kind"):
        make_task("t", TEXTS, labels)
    with pytest.raises(DataError, match="regression labels must be numeric; 1 are not"):
        make_task("t", TEXTS, labels, label_kind="regression")
    task = make_task("t", TEXTS, labels, label_kind="regression", drop_invalid=True)
    assert len(task.train) + len(task.test) == 19
    as_classes = make_task("t", TEXTS, labels, label_kind="classification")
    assert as_classes.classes == ("0", "0.5", "1", "1.5", "2", "high")


def test_few_distinct_floats_become_regression_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        task = make_task("t", TEXTS, [0.5, 1.5] * 10)
    assert task.label_kind == "regression"
    assert "only 2 distinct values (0.5, 1.5)" in caplog.text


def test_conflicting_duplicates_are_refused_or_dropped(caplog):
    texts = [*TEXTS, "Text  number 3", "text number 4"]
    labels = ["a", "b"] * 10 + ["a", "a"]  # row 4 says b, row 21 a; row 5 and 22 agree
    with pytest.raises(DataError, match=r"1 texts appear more than once with different labels "
                                        r"\(2 rows\); first: 'text number 3' labelled 'b' at "
                                        r"data row 4 and 'a' at data row 21.*conflicts='drop'"):
        make_task("t", texts, labels)
    with caplog.at_level(logging.WARNING):
        task = make_task("t", texts, labels, conflicts="drop")
    rows = set(task.train.texts) | set(task.test.texts)
    assert "text number 3" not in rows and "text number 4" in rows and len(rows) == 19
    assert "dropped the 2 rows of 1 texts" in caplog.text
    # against a given test split, too
    with pytest.raises(DataError, match="different labels"):
        make_task("t", TEXTS, ["a", "b"] * 10, test_texts=["text number 0", "z"],
                  test_labels=["b", "a"])
    with pytest.raises(ConfigError, match="'conflicts' must be one of"):
        make_task("t", TEXTS, ["a", "b"] * 10, conflicts="first")


def test_na_like_labels_name_the_file_and_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'NA' if i == 2 else i % 2}\n"
                                             for i in range(10)))
    with pytest.raises(DataError, match=r"d\.csv: of 10 rows, 1 with a missing label.*NA-like"
                                        r".*data row 3"):
        load_file(path)


# -- files (issue 19) -----------------------------------------------------------------------
def _rows(n=10):
    return "".join(f"caf\u00e9 {i},{'pos' if i % 2 else 'neg'}\n" for i in range(n))


def test_encoding_is_an_option_end_to_end(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(("text,label\n" + _rows()).encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.csv, line 2: byte 0xe9 is not valid utf-8.*"
                                        r"--encoding latin-1"):
        load_task(str(path))
    assert load_task(str(path), encoding="latin-1").train.texts[0].startswith("caf\u00e9")
    with pytest.raises(ConfigError, match="'encoding' must be a text encoding"):
        read_table(path, encoding="nope")
    with pytest.raises(ConfigError, match="'encoding' applies to local files"):
        load_hub("nobody/nothing", encoding="latin-1")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n',
     r"d\.jsonl, line 2: not valid JSON"),
    ("d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n',
     r"d\.jsonl, line 2: a JSON list where an object was expected"),
    ("d.json", '[{"text": "a",\n "label" 1}]', r"d\.json, line 2: not valid JSON"),
    ("d.json", '{"text": "a", "label": 1}\n{"text": "b" "label": 0}\n',
     r"d\.json, line 2: not valid JSON"),
    ("d.csv", "", r"d\.csv is empty \(0 bytes\)"),
    ("d.tsv", "\n\n", r"d\.tsv holds no columns"),
    ("d.csv", "text,label\n", r"d\.csv: no data rows"),
    ("d.csv", "text,label\n1,a\n2,b\n3,a\n", r"text column 'text' holds no text, only int"),
])
def test_file_errors_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_file(path)


def test_a_folder_is_not_a_data_file(tmp_path):
    (tmp_path / "x.csv").mkdir()
    with pytest.raises(DataError, match=r"x\.csv is a folder, not a data file"):
        load_task(str(tmp_path / "x.csv"))
