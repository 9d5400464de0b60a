import numpy as np
import pandas as pd
import pytest

from stepstone.esm.data import DataError, load_file, load_task, make_task, normalize_text


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
    with pytest.raises(DataError, match="1 rows have a missing or empty text and 2 a missing"):
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
