"""Task data: the labelled text datasets that sources and targets are made of.

A :class:`Task` holds a fixed train/test split of texts (or text pairs) with
labels, the label kind and the class names. Tasks come from the built-in
catalog (:mod:`stepstone.esm.catalog`), from local files (CSV, TSV, JSON, JSONL,
Parquet) or from the Hugging Face Hub; :func:`load_task` accepts all three.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from stepstone.esm.errors import ConfigError, StepstoneError
from stepstone.esm.sampling import holdout_indices, sample_indices

logger = logging.getLogger(__name__)

LabelKind = Literal["classification", "regression"]
LABEL_KINDS: tuple[str, ...] = ("classification", "regression")
OnConflict = Literal["error", "drop"]
ON_CONFLICT: tuple[str, ...] = ("error", "drop")
# The label-kind rule, as printed beside every inferred kind (see infer_label_kind).
RULE_GIVEN = "given as label_kind"
RULE_TEXT = "inferred: the labels are not numbers, so each distinct value is a class"
RULE_WHOLE = "inferred: every label is a whole number, so each distinct value is a class"
RULE_REAL = ("inferred: the labels are numbers and not all whole, so they are regression "
             "targets")
FEW_VALUES = 10  # regression inferred from this many distinct values or fewer: a warning
MANY_CLASSES = 50  # classes inferred from more whole numbers than this: a warning
FILE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
BUILTIN_PREFIX = "builtin:"


class DataError(StepstoneError, ValueError):
    """Raised when task data is missing, malformed or unusable."""


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
VOCAB_SIZE = 5000


def token_counts(texts: Sequence[str], *, top: int = VOCAB_SIZE) -> dict[str, int]:
    """Counts of the ``top`` most frequent lower-cased words, English stop words excluded.

    The source/target profile used by the vocabulary-overlap baseline.
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in _WORD.findall(text.lower()) if w not in ENGLISH_STOP_WORDS)
    return dict(counts.most_common(top))


def normalize_text(text: str) -> str:
    """Canonical form used for de-duplication and leakage checks."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a task.

    Parameters
    ----------
    texts : tuple of str, length n
    labels : array of shape (n,)
        int64 class indices into ``Task.classes`` or float64 regression values.
    text_pairs : tuple of str of length n, optional
        Second segment for sentence-pair tasks.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    text_pairs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise DataError(
                f"Split has {len(self.texts)} texts but {len(self.labels)} labels."
            )
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise DataError(
                f"Split has {len(self.texts)} texts but {len(self.text_pairs)} text pairs."
            )

    def __len__(self) -> int:
        return len(self.texts)

    def inputs(self) -> list[str] | list[tuple[str, str]]:
        """Encoder inputs: the texts, or (text, pair) tuples for pair tasks."""
        if self.text_pairs is None:
            return list(self.texts)
        return list(zip(self.texts, self.text_pairs, strict=True))

    def take(self, indices: Sequence[int] | np.ndarray) -> Split:
        idx = np.asarray(indices, dtype=np.int64)
        pairs = None if self.text_pairs is None else tuple(self.text_pairs[i] for i in idx)
        return Split(tuple(self.texts[i] for i in idx), self.labels[idx], pairs)


@dataclass(frozen=True, eq=False)
class Task:
    """A labelled text task with a fixed train/test split.

    Parameters
    ----------
    task_id : str
        Stable identifier (``sms_spam``; a local file's name, see :func:`default_task_id`).
    label_kind : {'classification', 'regression'}
    classes : tuple of str
        Class names for classification (label ``i`` is ``classes[i]``); empty for
        regression.
    train, test : Split
    origin : str
        Where the data came from (package and file, path or hub name).
    label_rule : str
        How ``label_kind`` was decided: given, or the inference rule that chose it
        (see :func:`infer_label_kind`); shown beside the kind in every output.
    split_note : str
        Where the test split came from (a test file, a Hub split, or rows held out of
        the training data, and how); shown by ``rank`` and ``transfer``.
    spec : dict
        How to load this data again from anywhere (absolute paths, columns, options;
        see :func:`stepstone.esm.specs.load_recorded`); recorded with ESMs built from
        it. Empty for tasks made in memory.
    """

    task_id: str
    label_kind: LabelKind
    classes: tuple[str, ...]
    train: Split
    test: Split
    origin: str = ""
    description: str = field(default="", compare=False)
    label_rule: str = field(default="", compare=False)
    split_note: str = field(default="", compare=False)
    spec: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise DataError(
                f"'label_kind' must be one of {list(LABEL_KINDS)}; got {self.label_kind!r}."
            )
        if self.label_kind == "classification" and len(self.classes) < 2:
            raise DataError(
                f"Task {self.task_id!r}: classification needs at least 2 classes; "
                f"got {list(self.classes)}."
            )
        if len(self.train) == 0:
            raise DataError(f"Task {self.task_id!r} has an empty train split.")

    @property
    def is_pair(self) -> bool:
        return self.train.text_pairs is not None

    @property
    def num_labels(self) -> int:
        """Number of model outputs: classes, or 1 for regression."""
        return len(self.classes) if self.label_kind == "classification" else 1

    def label_info(self) -> dict[str, object]:
        """``{'kind', 'num_classes', 'rule'}``: the label kind, how it was decided, and the
        class count (0 for regression), as printed by ``rank``, ``--json`` and builds."""
        return {"kind": self.label_kind, "num_classes": len(self.classes),
                "rule": self.label_rule or RULE_GIVEN}

    def label_summary(self) -> str:
        """``'classification, 2 classes (inferred: ...)'`` or ``'regression (given ...)'``."""
        kind = self.label_kind + (f", {len(self.classes)} classes"
                                  if self.label_kind == "classification" else "")
        return f"{kind} ({self.label_rule or RULE_GIVEN})"

    def data_hash(self) -> str:
        """SHA-256 over both splits' texts and labels (16 hex chars)."""
        h = hashlib.sha256()
        h.update(self.label_kind.encode())
        h.update("\x1f".join(self.classes).encode())
        for split in (self.train, self.test):
            h.update(b"\x1e")
            for i, text in enumerate(split.texts):
                h.update(text.encode())
                if split.text_pairs is not None:
                    h.update(b"\x1d" + split.text_pairs[i].encode())
                h.update(b"\x1f")
            h.update(np.ascontiguousarray(split.labels).tobytes())
        return h.hexdigest()[:16]

    def subsample(
        self, *, max_train: int | None = None, max_test: int | None = None, seed: int = 0
    ) -> Task:
        """A copy with at most ``max_train``/``max_test`` examples, stratified by class."""
        train = _cap(self.train, max_train, self.label_kind, seed)
        test = _cap(self.test, max_test, self.label_kind, seed)
        if train is self.train and test is self.test:
            return self
        return dataclasses.replace(self, train=train, test=test)

    def __str__(self) -> str:
        kind = (
            f"{len(self.classes)} classes" if self.label_kind == "classification" else "regression"
        )
        return f"Task({self.task_id}: {len(self.train)} train / {len(self.test)} test, {kind})"


def _cap(split: Split, limit: int | None, kind: str, seed: int) -> Split:
    if limit is None or len(split) <= limit:
        return split
    if limit < 1:
        raise DataError(f"A size cap must be a positive integer; got {limit}.")
    return split.take(sample_indices(split.labels, limit, seed=seed, label_kind=kind))


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return False


def infer_label_kind(labels: Sequence[object]) -> LabelKind:
    """The label kind of ``labels`` by one explicit rule.

    1. no label is a number (strings, booleans): classification, one class per value
       (:data:`RULE_TEXT`);
    2. every label is a number (numeric strings count) and all are whole:
       classification, one class per value (:data:`RULE_WHOLE`);
    3. every label is a number and some are not whole: regression (:data:`RULE_REAL`);
    4. numbers mixed with non-numbers: refused with :class:`DataError`, since one stray
       word in a numeric column would otherwise turn regression into classification.

    Pass ``label_kind`` to :func:`make_task` to decide instead of inferring.
    """
    numeric = [_is_number(v) for v in labels]
    if not all(numeric) and any(numeric):
        first = labels[numeric.index(False)]
        raise DataError(
            f"The labels mix {sum(numeric)} numbers with {numeric.count(False)} non-numeric "
            f"value(s) (e.g. {first!r}); pass label_kind='classification' or 'regression'.")
    return _infer_kind(labels, numeric)[0]


def _infer_kind(labels: Sequence[object], numeric: list[bool]) -> tuple[LabelKind, str]:
    if not any(numeric):
        return "classification", RULE_TEXT
    values = np.asarray([float(v) for v in labels], dtype=np.float64)  # type: ignore[arg-type]
    if np.all(values == np.round(values)):
        return "classification", RULE_WHOLE
    return "regression", RULE_REAL


def _class_name(value: object) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _strip_labels(labels: list[object], where: str, what: str) -> list[object]:
    """String labels without surrounding whitespace ('pos ' is 'pos'), with a warning
    that says how many changed."""
    changed = [v for v in labels if isinstance(v, str) and v != v.strip()]
    if not changed:
        return labels
    logger.warning(
        "%s: stripped surrounding whitespace from %d of %d values of %s (e.g. %r -> %r); "
        "labels that differ only by it are one class.", where, len(changed), len(labels),
        what, changed[0], changed[0].strip())  # type: ignore[union-attr]
    return [v.strip() if isinstance(v, str) else v for v in labels]


# A row: (normalised key, text, label, pair or None, index of the row in its input)
_Row = tuple


def _at(split: str, row: _Row) -> str:
    return f"data row {row[4] + 1}" + (" of the test data" if split == "test" else "")


def make_task(
    task_id: str,
    texts: Sequence[object],
    labels: Sequence[object],
    *,
    text_pairs: Sequence[object] | None = None,
    label_kind: LabelKind | None = None,
    classes: Sequence[str] | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    drop_invalid: bool = False,
    conflicts: OnConflict = "error",
    exclude_texts: frozenset[str] = frozenset(),
    test_texts: Sequence[object] | None = None,
    test_labels: Sequence[object] | None = None,
    test_text_pairs: Sequence[object] | None = None,
    origin: str = "",
    description: str = "",
) -> Task:
    """Validate raw columns and build a :class:`Task` with a fixed, seeded split.

    String labels lose surrounding whitespace (a warning says how many changed). The
    label kind is ``label_kind`` when given, else inferred by the rule of
    :func:`infer_label_kind`; the task records which (``Task.label_rule``).

    Rows are de-duplicated on the normalised text (the first occurrence is kept). A
    text that appears with different labels is never resolved by picking one:
    ``conflicts='error'`` (the default) refuses the data and names the first such
    text, ``conflicts='drop'`` drops every row of such texts (with a warning).
    ``exclude_texts`` (normalised) are dropped entirely, which is how tasks that share
    texts with another task's test split stay leak-free. When
    ``test_texts``/``test_labels`` are given, they are the test split (texts also in
    train are removed from train); otherwise a stratified ``test_size`` fraction is
    held out with ``seed``. Messages name ``origin`` (the file) and the data row
    (counted from 1, a header not counted).

    Raises
    ------
    DataError
        Empty data, missing texts or labels (unless ``drop_invalid``), a single
        class, a non-numeric regression label (unless ``drop_invalid``), labels that
        mix numbers and words (when inferring), or texts with conflicting labels
        (unless ``conflicts='drop'``).
    """
    if label_kind is not None and label_kind not in LABEL_KINDS:
        raise DataError(f"'label_kind' must be one of {list(LABEL_KINDS)}; got {label_kind!r}.")
    if not 0.0 < test_size < 1.0:
        raise DataError(f"'test_size' must be in (0, 1); got {test_size}.")
    if conflicts not in ON_CONFLICT:
        raise ConfigError(f"'conflicts' must be one of {list(ON_CONFLICT)}; got {conflicts!r}.")
    src = f"Task {task_id!r}" + (f" from {origin}" if origin else "")
    train_rows = _clean_rows(src, "train", texts, _strip_labels(list(labels), src, "the labels"),
                             text_pairs, drop_invalid)
    test_rows = None
    if test_texts is not None or test_labels is not None:
        if test_texts is None or test_labels is None:
            raise DataError("Give both 'test_texts' and 'test_labels', or neither.")
        test_rows = _clean_rows(
            src, "test", test_texts, _strip_labels(list(test_labels), src, "the test labels"),
            test_text_pairs, drop_invalid)

    def splits() -> list[tuple[str, list[_Row]]]:
        return [("train", train_rows)] + ([("test", test_rows)] if test_rows is not None else [])

    tagged = [(split, r) for split, rows in splits() for r in rows]
    rule = RULE_GIVEN
    if label_kind is None:
        numeric = [_is_number(r[2]) for _, r in tagged]
        if any(numeric) and not all(numeric):
            split, row = tagged[numeric.index(False)]
            n_bad = numeric.count(False)
            raise DataError(
                f"{src}: the labels mix {sum(numeric)} numbers with {n_bad} non-numeric "
                f"value{'s' if n_bad > 1 else ''} (e.g. {row[2]!r} at {_at(split, row)}), so "
                "their kind cannot be inferred: as classes, a stray word would turn a numeric "
                f"column into {len({_class_name(r[2]) for _, r in tagged})}-class "
                "classification. Fix the value(s), or say what the labels are: "
                "label_kind='regression' (with drop_invalid=True to drop non-numeric rows) or "
                "label_kind='classification' (every distinct value a class); CLI: "
                "--label-kind.")
        kind, rule = _infer_kind([r[2] for _, r in tagged], numeric)
    else:
        kind = label_kind

    if kind == "regression":
        bad = [(split, r) for split, r in tagged if not _is_number(r[2])]
        if bad and not drop_invalid:
            split, row = bad[0]
            raise DataError(
                f"{src}: regression labels must be numeric; {len(bad)} are not (e.g. "
                f"{row[2]!r} at {_at(split, row)}). Fix those rows, or drop them with "
                "drop_invalid=True (CLI: --drop-invalid).")
        if bad:
            split, row = bad[0]
            logger.warning("%s: dropping %d row(s) whose regression label is not a number "
                           "(first: %r at %s).", src, len(bad), row[2], _at(split, row))
            train_rows = [r for r in train_rows if _is_number(r[2])]
            if test_rows is not None:
                test_rows = [r for r in test_rows if _is_number(r[2])]
            if not train_rows:
                raise DataError(f"{src}: no row has a numeric label.")

    train_rows, test_rows = _resolve_conflicts(src, train_rows, test_rows, kind, conflicts,
                                               exclude_texts)
    all_labels = [r[2] for _, rows in splits() for r in rows]
    if kind == "regression":
        class_names: tuple[str, ...] = ()
        distinct = sorted({float(v) for v in all_labels})  # type: ignore[arg-type]
        if label_kind is None and len(distinct) <= FEW_VALUES:
            logger.warning(
                "%s: the labels are numbers with only %d distinct values (%s), taken as "
                "regression targets since not all are whole. If they are classes, pass "
                "label_kind='classification' (CLI: --label-kind classification).", src,
                len(distinct), ", ".join(f"{v:g}" for v in distinct))
    else:
        names = sorted({_class_name(v) for v in all_labels})
        if label_kind is None and rule == RULE_WHOLE and len(names) > MANY_CLASSES:
            logger.warning(
                "%s: %d classes, one per whole-number label (%s). If the labels are "
                "regression targets, pass label_kind='regression' (CLI: --label-kind "
                "regression).", src, len(names), RULE_WHOLE)
        if classes is not None:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise DataError(
                    f"Task {task_id!r}: labels {unknown} are not among the classes {list(classes)}."
                )
            names = list(classes)
        class_names = tuple(names)
        if len(set(_class_name(v) for v in all_labels)) < 2:
            raise DataError(
                f"Task {task_id!r}: classification needs at least 2 classes; every label is "
                f"{_class_name(all_labels[0])!r}."
            )

    def encode(values: list[object]) -> np.ndarray:
        if kind == "regression":
            return np.asarray([float(v) for v in values], dtype=np.float64)
        index = {c: i for i, c in enumerate(class_names)}
        return np.asarray([index[_class_name(v)] for v in values], dtype=np.int64)

    train_rows = _dedupe(train_rows, exclude_texts)
    test_given = test_rows is not None
    if test_rows is None:
        train_rows, test_rows = _split_rows(train_rows, kind, encode, test_size, seed)
    else:
        test_rows = _dedupe(test_rows, exclude_texts)
        test_keys = {r[0] for r in test_rows}
        train_rows = [r for r in train_rows if r[0] not in test_keys]
    if not train_rows:
        raise DataError(f"Task {task_id!r}: no training rows left after cleaning.")
    if not test_rows:
        raise DataError(f"Task {task_id!r}: the test split is empty; give more rows (every "
                        "class needs at least 2 to be split).")
    if kind == "classification":
        present = {_class_name(r[2]) for r in train_rows}
        if len(present) < 2:
            raise DataError(
                f"Task {task_id!r}: after de-duplication and exclusions the training split has "
                f"only the class(es) {sorted(present)}; classification needs at least 2.")

    def build(rows: list[tuple]) -> Split:
        pairs = None if text_pairs is None else tuple(r[3] for r in rows)
        return Split(tuple(r[1] for r in rows), encode([r[2] for r in rows]), pairs)

    if test_given:
        note = "the test data given"
    else:
        how = "stratified by class" if kind == "classification" else "uniformly"
        note = (f"{len(test_rows)} of {len(train_rows) + len(test_rows)} rows held out as "
                f"test ({test_size:.0%}, {how}, seed {seed})")
    return Task(task_id, kind, class_names, build(train_rows), build(test_rows), origin,
                description, rule, note)


def _is_number(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _clean_rows(src, split, texts, labels, pairs, drop_invalid) -> list[_Row]:
    texts, labels = list(texts), list(labels)
    what = src + (" (test data)" if split == "test" else "")
    if len(texts) != len(labels):
        raise DataError(f"{what}: {len(texts)} texts but {len(labels)} labels.")
    if pairs is not None:
        pairs = list(pairs)
        if len(pairs) != len(texts):
            raise DataError(f"{what}: {len(texts)} texts but {len(pairs)} text pairs.")
    if not texts:
        raise DataError(f"{what}: no data rows (the data is empty).")
    columns = [texts] if pairs is None else [texts, pairs]
    missing_text = sorted({i for col in columns for i, t in enumerate(col) if _is_missing(t)})
    other_text = sorted({i for col in columns for i, t in enumerate(col)
                         if not _is_missing(t) and not isinstance(t, str)})
    missing_label = [i for i, v in enumerate(labels) if _is_missing(v)]
    bad = sorted(set(missing_text) | set(other_text) | set(missing_label))
    if bad and not drop_invalid:
        parts = []
        if missing_text:
            parts.append(f"{len(missing_text)} with a missing or empty text (first: data row "
                         f"{missing_text[0] + 1})")
        if other_text:
            i = other_text[0]
            value = next(col[i] for col in columns if not isinstance(col[i], str))
            parts.append(f"{len(other_text)} whose text is not a string (first: data row "
                         f"{i + 1}, {type(value).__name__} {value!r})")
        if missing_label:
            parts.append(f"{len(missing_label)} with a missing label: empty, or an NA-like "
                         "value (NA, N/A, null, nan, None) that is read as missing (first: "
                         f"data row {missing_label[0] + 1})")
        raise DataError(f"{what}: of {len(texts)} rows, {'; '.join(parts)}. Fix those rows, "
                        "or drop them with drop_invalid=True (CLI: --drop-invalid).")
    if bad:
        logger.warning("%s: dropping %d invalid rows of %d (first: data row %d).", what,
                       len(bad), len(texts), bad[0] + 1)
    skip = set(bad)
    rows = [
        (normalize_text(t if pairs is None else t + "\x1f" + pairs[i]), t, labels[i],
         None if pairs is None else pairs[i], i)
        for i, t in enumerate(texts) if i not in skip
    ]
    if not rows:
        raise DataError(f"{what}: no valid rows left of {len(texts)}.")
    return rows


def _resolve_conflicts(src: str, train: list[_Row], test: list[_Row] | None, kind: str,
                       conflicts: str, exclude: frozenset[str]
                       ) -> tuple[list[_Row], list[_Row] | None]:
    """Find texts that appear with different labels; refuse them or drop all their rows."""
    def label(row: _Row) -> object:
        return float(row[2]) if kind == "regression" else _class_name(row[2])

    groups: dict[str, list[tuple[str, _Row]]] = {}
    for split, rows in (("train", train), ("test", test or [])):
        for r in rows:
            if r[0].split("\x1f")[0] not in exclude:
                groups.setdefault(r[0], []).append((split, r))
    bad = {key: g for key, g in groups.items() if len({label(r) for _, r in g}) > 1}
    if not bad:
        return train, test
    n_rows = sum(len(g) for g in bad.values())
    (split_a, a), *others = next(iter(bad.values()))
    split_b, b = next((s, r) for s, r in others if label(r) != label(a))
    text = a[1] if len(a[1]) <= 60 else a[1][:57] + "..."
    first = (f"{text!r} labelled {a[2]!r} at {_at(split_a, a)} and {b[2]!r} at "
             f"{_at(split_b, b)}")
    if conflicts == "error":
        raise DataError(
            f"{src}: {len(bad)} texts appear more than once with different labels "
            f"({n_rows} rows); first: {first}. Keeping one of the labels would be a guess: "
            "fix the data, or drop every row of these texts with conflicts='drop' (CLI: "
            "--on-conflict drop).")
    logger.warning("%s: dropped the %d rows of %d texts that appear with different labels "
                   "(first: %s).", src, n_rows, len(bad), first)
    train = [r for r in train if r[0] not in bad]
    if not train:
        raise DataError(f"{src}: no rows left after dropping the texts with conflicting labels.")
    return train, None if test is None else [r for r in test if r[0] not in bad]


def _dedupe(rows: list[tuple], exclude: frozenset[str]) -> list[tuple]:
    seen: set[str] = set()
    out = []
    for row in rows:
        key = row[0]
        if key in seen or key.split("\x1f")[0] in exclude:
            continue
        seen.add(key)
        out.append(row)
    return out


def _split_rows(rows, kind, encode, test_size, seed):
    n = len(rows)
    if n < 2:
        raise DataError(f"Need at least 2 distinct rows to split into train and test; got {n}.")
    labels = encode([r[2] for r in rows]) if kind == "classification" else np.zeros(n)
    chosen = holdout_indices(labels, test_size, seed=seed, label_kind=kind)
    test_set = set(chosen.tolist())
    train = [r for i, r in enumerate(rows) if i not in test_set]
    test = [r for i, r in enumerate(rows) if i in test_set]
    return train, test


# ---------------------------------------------------------------------------- files & hub


def read_table(path: str | Path, *, encoding: str = "utf-8"):
    """Read a CSV/TSV/JSON/JSONL/Parquet file into a pandas DataFrame.

    ``encoding`` is the text encoding of CSV/TSV/JSON/JSONL files (Parquet carries its
    own). Every failure is a :class:`DataError` that names the file, the line where
    one applies, and the fix (another ``encoding``, the broken line, ...).
    """
    import pandas as pd

    _check_encoding(encoding)
    path = Path(path)
    if not path.exists():
        raise DataError(f"No such data file: {str(path)!r}.")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file; give one "
                        f"{'/'.join(FILE_SUFFIXES)} file.")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            f"Unsupported data file suffix {suffix!r} for {str(path)!r}; expected one of "
            f"{list(FILE_SUFFIXES)}."
        )
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err.strerror or err}.") from None
    if size == 0:
        raise DataError(f"{path} is empty (0 bytes); expected "
                        + ("one JSON object per line." if suffix == ".jsonl" else
                           "a header line and data rows." if suffix in (".csv", ".tsv")
                           else "data."))
    try:
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="," if suffix == ".csv" else "\t",
                               encoding=encoding)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, encoding=encoding)
        if suffix == ".json":
            try:
                return pd.read_json(path, encoding=encoding)
            except UnicodeDecodeError:
                raise
            except ValueError:
                return pd.read_json(path, lines=True, encoding=encoding)
        return pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(_decode_message(path, encoding, err)) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} holds no columns (only blank lines); expected a header line "
                        "and data rows.") from None
    except pd.errors.ParserError as err:
        raise DataError(f"{path} is not a valid {suffix[1:].upper()} file: "
                        f"{str(err).strip()} (a quote left open, or a line with more fields "
                        "than the header?).") from None
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err.strerror or err}.") from None
    except ValueError as err:  # pandas' JSON errors; pyarrow's ArrowInvalid
        if suffix == ".parquet":
            raise DataError(f"{path} is not a readable Parquet file: {err}") from None
        raise DataError(_json_message(path, encoding, err)) from None
    except TypeError as err:  # pandas, on JSON lines that are not all objects
        if suffix == ".parquet":
            raise
        raise DataError(_json_message(path, encoding, err)) from None


def _check_encoding(encoding: str) -> None:
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ConfigError(f"'encoding' must be a text encoding Python knows (utf-8, latin-1, "
                          f"cp1252, ...); got {encoding!r}.") from None


def _decode_message(path: Path, encoding: str, err: UnicodeDecodeError) -> str:
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as whole:
        err = whole  # pandas' own error counts from the start of a chunk, not the file
    line = data.count(b"\n", 0, err.start) + 1
    byte = err.object[err.start:err.start + 1].hex()
    return (f"{path}, line {line}: byte 0x{byte} is not valid {encoding} text, so the file "
            "is in another encoding. Pass it with --encoding (encoding=...): --encoding "
            "latin-1 reads any byte (cp1252 for Windows files), or re-save the file as "
            "UTF-8.")


def _json_message(path: Path, encoding: str, err: Exception) -> str:
    text = path.read_text(encoding=encoding)
    lines = text.splitlines()
    jsonl = path.suffix.lower() == ".jsonl"
    if not jsonl:
        try:
            json.loads(text)
        except json.JSONDecodeError as doc_err:
            first = next((ln for ln in lines if ln.strip()), "")
            try:  # one JSON object per line, like a .jsonl file?
                jsonl = isinstance(json.loads(first), dict)
            except json.JSONDecodeError:
                jsonl = False
            if not jsonl:
                return (f"{path}, line {doc_err.lineno}: not valid JSON ({doc_err.msg}, "
                        f"column {doc_err.colno}).")
        else:
            return (f"{path}: the JSON is not a table ({err}); expected a list of records "
                    "like [{\"text\": ..., \"label\": ...}, ...] or one object per line.")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as line_err:
            return (f"{path}, line {number}: not valid JSON ({line_err.msg}, column "
                    f"{line_err.colno}); a JSON Lines file holds one JSON object per line.")
        if not isinstance(value, dict):
            return (f"{path}, line {number}: a JSON {type(value).__name__} where an object "
                    "was expected; a JSON Lines file holds one JSON object per line.")
    return f"{path}: not readable as JSON Lines: {err}"


def task_from_frame(
    frame,
    *,
    task_id: str,
    text_column: str | Sequence[str],
    label_column: str,
    test_frame=None,
    origin: str = "",
    **options,
) -> Task:
    """Build a task from a DataFrame (and optionally a separate test DataFrame).

    ``options`` go to :func:`make_task`. A text column that holds no strings at all
    (numbers, say) is refused with the column names, and label whitespace is stripped
    with a warning that names ``label_column``.
    """
    columns = [text_column] if isinstance(text_column, str) else list(text_column)
    if not 1 <= len(columns) <= 2:
        raise DataError(
            f"'text_column' takes one column, or two for sentence pairs; got {columns}."
        )
    where = origin or task_id
    for df, name in ((frame, "data"), (test_frame, "test data")):
        if df is None:
            continue
        missing = [c for c in [*columns, label_column] if c not in df.columns]
        if missing:
            raise DataError(
                f"Column(s) {missing} not found in the {name} of {where!r}; "
                f"the columns are {list(map(str, df.columns))}."
            )
        for column in columns:
            values = df[column].tolist()
            given = [(i, v) for i, v in enumerate(values) if not _is_missing(v)]
            if given and not any(isinstance(v, str) for _, v in given):
                i, value = given[0]
                raise DataError(
                    f"{where}: text column {column!r} holds no text, only "
                    f"{type(value).__name__} values (first: {value!r} at data row {i + 1}). "
                    "Name the column that holds the texts with --text-column "
                    f"(text_column=...); the columns are {list(map(str, df.columns))}.")

    def cols(df):
        pairs = df[columns[1]].tolist() if len(columns) == 2 else None
        labels = _strip_labels(df[label_column].tolist(), where, f"label column {label_column!r}")
        return df[columns[0]].tolist(), labels, pairs

    texts, labels, pairs = cols(frame)
    extra = {}
    if test_frame is not None:
        t, lab, p = cols(test_frame)
        extra = {"test_texts": t, "test_labels": lab, "test_text_pairs": p}
    return make_task(task_id, texts, labels, text_pairs=pairs, origin=origin, **extra, **options)


# File stems that name a split, not a dataset: a task read from ``D/train.csv`` is named
# after its folder ``D`` (see :func:`default_task_id`).
SPLIT_STEMS: frozenset[str] = frozenset({
    "train", "training", "test", "testing", "dev", "devel", "development", "val", "valid",
    "validation", "eval", "evaluation"})
# The make_task options a file or Hub task records in ``Task.spec`` to be reloaded.
_RECORDED_OPTIONS = ("label_kind", "drop_invalid", "conflicts", "test_size", "seed")


def default_task_id(path: str | Path) -> str:
    """The default task name of a data file: its stem, or its folder's name when the stem
    names a split (``banking/train.csv`` -> ``banking``; ``reviews.csv`` -> ``reviews``)."""
    path = Path(path)
    if path.stem.casefold() in SPLIT_STEMS:
        folder = path.absolute().parent.name
        if folder:
            return folder
    return path.stem


def _recorded(options: dict) -> dict:
    return {k: options[k] for k in _RECORDED_OPTIONS if options.get(k) is not None}


def load_file(
    path: str | Path | None = None,
    *,
    test_file: str | Path | None = None,
    train: str | Path | None = None,
    test: str | Path | None = None,
    text_column: str | Sequence[str] = "text",
    label_column: str = "label",
    task_id: str | None = None,
    encoding: str = "utf-8",
    **options,
) -> Task:
    """Load a local CSV/TSV/JSON/JSONL/Parquet file as a task.

    The test split is ``test_file`` when given (same columns; CLI ``--test-file``);
    otherwise a stratified 20% of the rows is held out (``test_size``, ``seed``; see
    :func:`make_task`). ``load_file(train=..., test=...)`` is the same as
    ``load_file(path, test_file=...)``. The task is named ``task_id``, else by
    :func:`default_task_id`. ``encoding``: the files' text encoding (CLI ``--encoding``;
    'latin-1' reads any byte); ``options`` go to :func:`make_task`.
    """
    if train is not None:
        if path is not None:
            raise ConfigError(f"Give the training file once: as 'path' or as 'train'; got "
                              f"path={str(path)!r} and train={str(train)!r}.")
        path = train
    if test is not None:
        if test_file is not None:
            raise ConfigError(f"Give the test file once: as 'test_file' or as 'test'; got "
                              f"test_file={str(test_file)!r} and test={str(test)!r}.")
        test_file = test
    if path is None:
        raise ConfigError("load_file needs the training data file: load_file(path) or "
                          "load_file(train=..., test=...).")
    if test_file is not None and Path(test_file).absolute() == Path(path).absolute():
        raise ConfigError(f"The test file is the training file ({str(path)!r}); give a "
                          "separate file, or none to hold out part of the rows.")
    frame = read_table(path, encoding=encoding)
    test_frame = None if test_file is None else read_table(test_file, encoding=encoding)
    task = task_from_frame(
        frame, task_id=task_id or default_task_id(path), text_column=text_column,
        label_column=label_column, test_frame=test_frame, origin=str(path), **options,
    )
    if test_file is not None:
        note = f"test file {test_file} ({len(task.test)} rows)"
    else:
        note = f"{task.split_note}; give a test file (--test-file) to use your own"
    spec = {"file": str(Path(path).resolve()),
            "test_file": None if test_file is None else str(Path(test_file).resolve()),
            "task_id": task.task_id, "text_column": text_column,
            "label_column": label_column, "encoding": encoding, **_recorded(options)}
    return dataclasses.replace(task, split_note=note, spec=spec)


def load_hub(
    name: str,
    *,
    text_column: str | Sequence[str] = "text",
    label_column: str = "label",
    config: str | None = None,
    encoding: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    task_id: str | None = None,
    **options,
) -> Task:
    """Load a Hugging Face Hub dataset (needs the Hub, or its files in the local cache).

    The test split is ``test_split`` when given (CLI ``--test-split``), else the
    dataset's ``test`` split, else ``validation``; when there is none (or its labels
    are hidden, GLUE-style -1), a stratified 20% of ``train_split`` is held out.
    """
    import datasets
    import pandas as pd

    if encoding is not None:
        raise ConfigError(f"'encoding' applies to local files; {name!r} is not one (it is "
                          "loaded from the Hugging Face Hub).")

    try:
        dd = datasets.load_dataset(name, config)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise DataError(
            f"Cannot load {name!r}: it is not 'builtin:ID', not an existing "
            f"{'/'.join(FILE_SUFFIXES)} file, and as a Hugging Face Hub dataset it failed: "
            f"{type(err).__name__}: {err}") from None
    for split, flag in ((train_split, "train_split"), (test_split, "test_split")):
        if split is not None and split not in dd:
            raise DataError(f"Hub dataset {name!r} has no split {split!r} ({flag}); it has "
                            f"{list(dd)}.")
    test_name = test_split or next((s for s in ("test", "validation") if s in dd
                                    and s != train_split), None)
    train = dd[train_split].to_pandas()
    test = dd[test_name].to_pandas() if test_name else None
    hidden = test is not None and label_column in test and pd.api.types.is_numeric_dtype(
        test[label_column]) and (test[label_column] < 0).all()
    if hidden and test_split is not None:
        raise DataError(f"Hub dataset {name!r}: every label of split {test_split!r} is "
                        "negative (hidden test labels); choose another test split.")
    if hidden:
        test = None  # GLUE-style hidden test labels (-1): hold out from train instead.
    label_feature = dd[train_split].features.get(label_column)
    if getattr(label_feature, "names", None):
        names = label_feature.names
        train[label_column] = [names[i] for i in train[label_column]]
        if test is not None:
            test[label_column] = [names[i] for i in test[label_column]]
    task = task_from_frame(
        train, task_id=task_id or name.replace("/", "__"), text_column=text_column,
        label_column=label_column, test_frame=test, origin=f"hub:{name}", **options,
    )
    if test is not None:
        note = f"Hub split {test_name!r} ({len(task.test)} rows)"
    else:
        why = "its labels are hidden" if hidden else "the dataset has no test split"
        note = f"{task.split_note} of Hub split {train_split!r} ({why})"
    spec = {"hub": name, "config": config, "train_split": train_split,
            "test_split": test_name if test is not None else None, "task_id": task.task_id,
            "text_column": text_column, "label_column": label_column, **_recorded(options)}
    return dataclasses.replace(task, split_note=note, spec=spec)

