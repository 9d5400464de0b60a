"""Task specs: what a string naming a task means, and lists of them.

A spec is ``builtin:ID`` (a task of the built-in catalog), a local CSV/TSV/JSON/JSONL/
Parquet file, or a Hugging Face Hub dataset name. This module sits above both
:mod:`stepstone.esm.data` (files, the Hub) and :mod:`stepstone.esm.catalog` (built-in
tasks), so neither has to import the other's caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

# modules, not names: what a test (or a caller) swaps in them is what resolves here
from stepstone.esm import catalog, data
from stepstone.esm.data import BUILTIN_PREFIX, FILE_SUFFIXES, Task

__all__ = ["expand_specs", "load_task"]

logger = logging.getLogger(__name__)

ALL_BUILTIN = ("builtin:all", "all")


def expand_specs(specs: str | Task | Iterable[str | Task]) -> list[str | Task]:
    """One list of task specs from comma-separated strings, lists and Task objects.

    ``all``/``builtin:all`` stands for every built-in task whose package is installed
    (the others are named in a warning), a bare built-in id becomes ``builtin:ID``, and
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
                missing = [i for i in catalog.builtin_ids() if not catalog.is_available(i)]
                if missing:
                    logger.warning("Skipping built-in tasks whose package is not installed: %s",
                                   missing)
                for i in catalog.builtin_ids():
                    if catalog.is_available(i):
                        add(BUILTIN_PREFIX + i)
            elif part in catalog.builtin_ids():
                add(BUILTIN_PREFIX + part)
            else:
                add(part)
    return out


def load_task(spec: str | Task, **options) -> Task:
    """Resolve a task spec: ``builtin:ID``, a local file path or a Hub dataset name.

    ``options`` go to :func:`~stepstone.esm.data.load_file` /
    :func:`~stepstone.esm.data.load_hub` (``text_column``, ``label_column``,
    ``label_kind``, ``drop_invalid``, ``test_size``, ``seed``); built-in tasks take none.
    """
    if isinstance(spec, Task):
        return spec
    if spec.startswith(BUILTIN_PREFIX):
        return catalog.load_builtin(spec[len(BUILTIN_PREFIX):])
    if spec.startswith("hub:"):  # the origin recorded for Hub tasks
        return data.load_hub(spec[len("hub:"):], **options)
    path = Path(spec)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists() or "\\" in spec:
        return data.load_file(path, **options)
    return data.load_hub(spec, **options)
