"""Texts a target shares with a source: exact and normalised matches.

A source that holds the target's texts inflates what ranking and transfer measure (the
source model has seen the target's test texts, perhaps with their labels). The checks
use the catalog's own notions: the exact text, and
:func:`stepstone.esm.data.normalize_text` (case and white space folded), on the first
segment of sentence pairs (as :mod:`stepstone.esm.catalog` keys them).

A source's texts are known as hashed keys (:func:`text_keys`): registry builds store
them in the ESM's ``profile.json``; for ESMs built before that, the keys are computed
from the source data when it can be loaded (a built-in task, or a file recorded in the
ESM's config), and kept in the embedding cache folder when one is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stepstone.esm.data import Task, normalize_text
from stepstone.esm.errors import StepstoneError
from stepstone.esm.registry import Registry, RegistryEntry

logger = logging.getLogger(__name__)

__all__ = ["Overlap", "overlap", "source_text_keys", "task_texts", "text_keys"]

KEYS_NAME = "text_keys"  # the profile.json key; also the cache sub-folder
_DIGEST = 6  # bytes per key: 48 bits, so chance collisions stay far below one text


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=_DIGEST).hexdigest()


def task_texts(task: Task) -> list[str]:
    """Every text of both splits (the first segment of pairs)."""
    return [*task.train.texts, *task.test.texts]


def text_keys(texts: Iterable[str]) -> dict[str, list[str]]:
    """``{'exact': [...], 'normalised': [...]}``: sorted hashed keys of ``texts``."""
    texts = list(texts)
    return {"exact": sorted({_hash(t) for t in texts}),
            "normalised": sorted({_hash(normalize_text(t)) for t in texts})}


@dataclass(frozen=True)
class Overlap:
    """How many of ``of`` distinct target texts a source holds: ``exact`` (the same
    string) and ``normalised`` (the same after folding case and white space; includes
    the exact ones)."""

    exact: int
    normalised: int
    of: int

    def __bool__(self) -> bool:
        return self.normalised > 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.normalised} of {self.of} target texts ({self.exact} exact, "
                f"{self.normalised} after normalising case and white space)")


def overlap(target: Sequence[str] | Task, source: dict[str, list[str]] | Sequence[str] | Task
            ) -> Overlap:
    """The target's texts found in the source (texts, a task, or :func:`text_keys`)."""
    target_texts = task_texts(target) if isinstance(target, Task) else list(target)
    return _TargetKeys(target_texts).overlap(source)


class _TargetKeys:
    """A target's texts hashed once (one key per distinct text, exact and normalised),
    for checking many sources against it."""

    def __init__(self, texts: Sequence[str]) -> None:
        distinct = {normalize_text(t): t for t in texts}
        self.exact = [_hash(t) for t in set(texts)]
        self.normalised = [_hash(k) for k in distinct]

    def overlap(self, source: dict[str, list[str]] | Sequence[str] | Task) -> Overlap:
        if isinstance(source, Task):
            source = text_keys(task_texts(source))
        elif not isinstance(source, dict):
            source = text_keys(source)
        exact_keys, norm_keys = set(source["exact"]), set(source["normalised"])
        return Overlap(sum(k in exact_keys for k in self.exact),
                       sum(k in norm_keys for k in self.normalised), len(self.normalised))


def _load_source(registry: Registry, entry: RegistryEntry) -> Task | None:
    """The source data of ``entry`` when it can be loaded here with the recorded data
    hash (a recorded spec, or a built-in task); else None."""
    from stepstone.esm.catalog import builtin_ids
    from stepstone.esm.specs import load_recorded

    config = registry.config(entry.id)
    spec = config.task_spec or (
        {"builtin": config.task_id} if config.task_id in builtin_ids() else None)
    if not spec or ("builtin" not in spec and "file" not in spec):
        return None  # a Hub dataset is not fetched for a check
    try:
        task = load_recorded(spec)
    except (StepstoneError, OSError) as err:
        logger.info("Leakage check: the source data of %s cannot be loaded (%s).", entry.id,
                    err)
        return None
    if config.task_data_hash and task.data_hash() != config.task_data_hash:
        logger.info("Leakage check: the source data of %s changed since it was built.",
                    entry.id)
        return None
    return task


def source_text_keys(registry: Registry, entry: RegistryEntry, *,
                     cache_dir: str | Path | None = None) -> dict[str, list[str]] | None:
    """The hashed text keys of an ESM's source data, or None when unknown (built before
    keys were stored, and its data cannot be loaded here)."""
    keys = registry.profile(entry.id).get(KEYS_NAME)
    if keys:
        return keys
    config = registry.config(entry.id)
    cached = None
    if cache_dir is not None and config.task_data_hash:
        cached = Path(cache_dir) / KEYS_NAME / f"{config.task_data_hash}.json"
        if cached.is_file():
            try:
                return json.loads(cached.read_text())
            except (OSError, json.JSONDecodeError):
                pass  # recomputed and rewritten below
    task = _load_source(registry, entry)
    if task is None:
        return None
    keys = text_keys(task_texts(task))
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(keys))
            tmp.replace(cached)
        except OSError as err:
            logger.info("Could not keep the text keys in %s: %s", cached, err)
    return keys


def leakage_report(target: Task, registry: Registry, entries: Sequence[RegistryEntry], *,
                   cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Per ESM id: ``Overlap.to_dict()`` of the target with its source, only for sources
    that share texts, plus ``{'unknown': reason}`` for sources whose texts are unknown."""
    texts = _TargetKeys(task_texts(target))
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        try:
            keys = source_text_keys(registry, entry, cache_dir=cache_dir)
        except (StepstoneError, OSError, ValueError) as err:  # ValueError: a broken JSON
            out[entry.id] = {"unknown": f"{type(err).__name__}: {err}"}
            continue
        if keys is None:
            out[entry.id] = {"unknown": "its source data cannot be loaded here"}
            continue
        found = texts.overlap(keys)
        if found:
            out[entry.id] = found.to_dict()
    return out
