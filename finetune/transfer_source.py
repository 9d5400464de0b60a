"""Which source task a transfer run uses, and where its model comes from.

``auto`` takes the top of :func:`stepstone.selection.ranking.rank`; an ESM id or task id
is looked up in the registry (reloading the task data the ESM was built from, checked
against its recorded data hash); any other spec is loaded as a task.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepstone.esm.data import DataError, Task
from stepstone.esm.encoder import Encoder
from stepstone.esm.registry import Registry
from stepstone.esm.specs import load_task

logger = logging.getLogger(__name__)


@dataclass
class SourceChoice:
    """Which source task a transfer uses and where its model comes from."""

    task: Task
    esm_id: str | None = None
    selected_by: str = "given"  # 'auto' (top of a ranking) or 'given'
    model_dir: Path | None = None  # a source model the registry kept
    ranking: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task.task_id, "origin": self.task.origin,
                "esm_id": self.esm_id, "selected_by": self.selected_by,
                "source_model": "registry" if self.model_dir else "fine-tuned",
                "num_train": len(self.task.train), "num_test": len(self.task.test),
                "ranking": self.ranking}


def choose_source(
    target: Task,
    source: str | Task,
    registry: Registry,
    *,
    encoder: Encoder,
    method: str = "esm-logme",
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
) -> SourceChoice:
    """Resolve ``source``: ``auto`` (best of ``rank``), an ESM id or task id in the
    registry, or any task spec (``builtin:ID``, a file, a Hub name, a Task)."""
    if isinstance(source, Task):
        return SourceChoice(source)
    if source == "auto":
        from stepstone.selection.ranking import rank

        ranking = rank(target, registry, method, encoder=encoder, progress=progress)
        if not ranking.rows:
            raise DataError(f"No source in {registry.path} could be ranked for "
                            f"{target.task_id!r}: {ranking.errors}")
        top = [dataclasses.asdict(r) for r in ranking.rows[:5]]
        choice = _from_registry(registry, ranking.rows[0].esm_id)
        choice.selected_by, choice.ranking = "auto", top
        return choice
    if source in registry:
        return _from_registry(registry, source)
    task_id = source.removeprefix("builtin:")
    matches = [e for e in registry.entries() if e.task_id == task_id
               and registry.config(e.id).encoder.get("layer") is None]
    if matches:
        return _from_registry(registry, matches[0].id)
    return SourceChoice(load_task(source, **(task_options or {})))


def _from_registry(registry: Registry, esm_id: str) -> SourceChoice:
    # The config decides which data is read: trust it only when the ESM's files still
    # match the checksum recorded when it was added.
    config = registry.config(esm_id, verify=True)
    from stepstone.esm.catalog import builtin_ids
    from stepstone.esm.data import FILE_SUFFIXES

    origin, builtin = config.task_origin, config.task_id in builtin_ids()
    # A recorded origin is reloaded only as a data file or Hub spec whose data hash
    # matches the build's; built-in tasks record a readable origin, not a loadable spec.
    loadable = origin.startswith("hub:") or (
        Path(origin).suffix.lower() in FILE_SUFFIXES and (not builtin or Path(origin).is_file()))
    task = None
    if loadable and config.task_data_hash:
        recorded = load_task(origin)
        if recorded.data_hash() == config.task_data_hash:
            task = recorded
        elif not builtin:
            raise DataError(
                f"The data at {origin!r} changed since ESM {esm_id!r} was built (data hash "
                f"{recorded.data_hash()} vs {config.task_data_hash}); pass the source as a "
                "task spec (builtin:ID, a file or a Hub name) to use it anyway.")
    if task is None and builtin:
        task = load_task(f"builtin:{config.task_id}")
        if config.task_data_hash and task.data_hash() != config.task_data_hash:
            logger.warning("Source %s: the built-in data changed since ESM %s was built.",
                           task.task_id, esm_id)
    if task is None:
        raise DataError(
            f"ESM {esm_id!r} records its task origin as {origin!r}, which is not a built-in "
            f"task, nor a {'/'.join(FILE_SUFFIXES)} file or hub: dataset with a recorded data "
            "hash; pass the source as a task spec (builtin:ID, a file or a Hub name).")
    return SourceChoice(task, esm_id, model_dir=registry.model_dir(esm_id))
