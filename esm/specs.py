"""Task specs: what a string naming a task means, and lists of them.

A spec is ``builtin:ID`` (a task of the built-in catalog), a local CSV/TSV/JSON/JSONL/
Parquet file, or a Hugging Face Hub dataset name. This module sits above both
:mod:`stepstone.esm.data` (files, the Hub) and :mod:`stepstone.esm.catalog` (built-in
tasks), so neither has to import the other's caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# modules, not names: what a test (or a caller) swaps in them is what resolves here
from stepstone.esm import catalog, data
from stepstone.esm.data import BUILTIN_PREFIX, FILE_SUFFIXES, DataError, Task
from stepstone.esm.errors import ConfigError

__all__ = ["expand_specs", "load_recorded", "load_task"]

logger = logging.getLogger(__name__)

ALL_BUILTIN = ("builtin:all", "all")


def expand_specs(specs: str | Task | Iterable[str | Task]) -> list[str | Task]:
    """One list of task specs from comma-separated strings, lists and Task objects.

    ``all``/``builtin:all`` stands for every built-in task of the benchmark pool
    (:func:`stepstone.esm.catalog.pool_ids`) whose package is installed (the others are
    named in a warning), a bare built-in id becomes ``builtin:ID``, and
    anything else (a path, a Hub name) is kept as written. Order is kept; a spec given
    twice appears once.
    """
    if isinstance(specs, (str, Task)):
        specs = [specs]
    out: list[str | Task] = []
    seen: set[str] = set()

    def add(spec: str) -> None:
        if spec not in seen:
            seen.add(spec)
            out.append(spec)

    for item in specs:
        if isinstance(item, Task):
            out.append(item)
            continue
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            if part in ALL_BUILTIN:
                missing = [i for i in catalog.pool_ids() if not catalog.is_available(i)]
                if missing:
                    logger.warning("Skipping built-in tasks whose package is not installed: %s",
                                   missing)
                for i in catalog.pool_ids():
                    if catalog.is_available(i):
                        add(BUILTIN_PREFIX + i)
            elif part in catalog.builtin_ids():
                add(BUILTIN_PREFIX + part)
            else:
                add(part)
    return out


def load_task(spec: str | Task | Mapping[str, Any], **options) -> Task:
    """Resolve a task spec: ``builtin:ID``, a local file path, a Hub dataset name, or a
    recorded spec (``Task.spec``, see :func:`load_recorded`).

    ``options`` go to :func:`~stepstone.esm.data.load_file` /
    :func:`~stepstone.esm.data.load_hub` (``text_column``, ``label_column``,
    ``label_kind``, ``drop_invalid``, ``test_size``, ``seed``, ``task_id``; a file's
    ``test_file``, a Hub dataset's ``test_split``); built-in tasks take none.
    """
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, Mapping):
        return load_recorded(spec, **options)
    if spec.startswith(BUILTIN_PREFIX):
        _refuse(spec, options, "a built-in task has its own split and name")
        return catalog.load_builtin(spec[len(BUILTIN_PREFIX):])
    if spec.startswith("hub:"):  # the origin recorded for Hub tasks
        return data.load_hub(spec[len("hub:"):], **_hub_options(spec, options))
    path = Path(spec)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists() or "\\" in spec:
        if options.get("test_split") is not None:
            raise ConfigError(f"'test_split' names a split of a Hub dataset; {spec!r} is a "
                              "local file (give its test data as 'test_file').")
        options.pop("test_split", None)
        return data.load_file(path, **options)
    return data.load_hub(spec, **_hub_options(spec, options))


def _refuse(spec: str, options: dict[str, Any], why: str) -> None:
    given = sorted(k for k in ("test_file", "test_split", "task_id")
                   if options.get(k) is not None)
    if given:
        raise ConfigError(f"{given[0]!r} does not apply to {spec!r}: {why}.")


def _hub_options(spec: str, options: dict[str, Any]) -> dict[str, Any]:
    if options.get("test_file") is not None:
        raise ConfigError(f"'test_file' applies to a local data file; {spec!r} is not one "
                          "(it is loaded from the Hugging Face Hub; name its test split with "
                          "'test_split').")
    return {k: v for k, v in options.items() if k != "test_file"}


def load_recorded(spec: Mapping[str, Any], **options) -> Task:
    """Load a task again from the spec it recorded (``Task.spec``): ``{"builtin": ID}``,
    ``{"file": ABSOLUTE PATH, "test_file": ..., "text_column": ..., ...}`` or
    ``{"hub": NAME, "config": ..., "test_split": ..., ...}``; ``options`` override the
    recorded ones.

    Raises
    ------
    DataError
        When a recorded file is gone (the message names it).
    """
    spec = dict(spec)
    if "builtin" in spec:
        return catalog.load_builtin(spec["builtin"])
    merged = {k: v for k, v in spec.items() if k not in ("file", "hub")}
    merged.update({k: v for k, v in options.items() if v is not None})
    if "file" in spec:
        for key in ("file", "test_file"):
            path = spec.get(key) if key == "file" else merged.get(key)
            if path is not None and not Path(path).is_file():
                raise DataError(f"The data file {path!r} is gone (no file there any more).")
        merged.pop("test_split", None)
        return data.load_file(spec["file"], **merged)
    if "hub" in spec:
        merged.pop("test_file", None)
        return data.load_hub(spec["hub"], **merged)
    raise DataError(f"A recorded task spec names 'builtin', 'file' or 'hub'; got {spec}.")
