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
from stepstone.esm.model import ESMConfig
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
    #: the gain model's verdict for ``auto`` (stepstone.selection.gain.Recommendation)
    recommendation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task.task_id, "origin": self.task.origin,
                "esm_id": self.esm_id, "selected_by": self.selected_by,
                "source_model": "registry" if self.model_dir else "fine-tuned",
                "num_train": len(self.task.train), "num_test": len(self.task.test),
                "ranking": self.ranking, "recommendation": self.recommendation}


def choose_source(
    target: Task,
    source: str | Task,
    registry: Registry,
    *,
    encoder: Encoder,
    method: str = "esm-logme",
    progress: bool = True,
    source_options: dict[str, Any] | None = None,
    force: bool = False,
) -> SourceChoice:
    """Resolve ``source``: ``auto`` (best of ``rank``), an ESM id or task id in the
    registry, or any task spec (``builtin:ID``, a file, a Hub name, a Task).

    ``source_options`` are the source's own data options (``text_column``,
    ``label_column``, ``test_file``, ...; CLI ``--source-text-column`` etc.), never the
    target's. An ESM in the registry reloads the data it was built from as recorded
    (absolute path, columns, options; checked by data hash); ``source_options``
    override the recorded ones.

    ``auto`` follows the gain model's recommendation
    (:mod:`stepstone.selection.gain`): its source, or, when no source is expected to
    help, :class:`~stepstone.selection.gain.NoSourceRecommended` unless ``force``
    (then the top of the ranking). Without an applicable gain model it takes the top
    of the ranking and records why.
    """
    if isinstance(source, Task):
        return SourceChoice(source)
    if source == "auto":
        from stepstone.selection.ranking import rank

        ranking = rank(target, registry, method, encoder=encoder, progress=progress,
                       check_leakage=False)
        if not ranking.rows:
            raise DataError(f"No source in {registry.path} could be ranked for "
                            f"{target.task_id!r}: {ranking.errors}")
        from stepstone.selection.gain import NoSourceRecommended

        top = [dataclasses.asdict(r) for r in ranking.rows[:5]]
        rec = ranking.recommendation
        esm_id, selected_by = ranking.rows[0].esm_id, "auto"
        if rec is not None and rec.kind == "source":
            esm_id, selected_by = rec.esm_id, "auto (gain model)"
        elif rec is not None and rec.kind == "none":
            if not force:
                raise NoSourceRecommended(
                    f"{target.task_id}: {rec} Give a source (--source ID) or force the top "
                    f"of the ranking (--force) to transfer anyway.")
            selected_by = "auto (forced: the gain model recommends no source)"
            logger.warning("%s; forced to take the top of the ranking, %s.", rec,
                           ranking.rows[0].task_id)
        elif rec is not None:
            logger.info("%s; taking the top of the ranking.", rec)
        choice = _from_registry(registry, esm_id, source_options)
        choice.selected_by, choice.ranking = selected_by, top
        choice.recommendation = None if rec is None else rec.to_dict()
        return choice
    if source in registry:
        return _from_registry(registry, source, source_options)
    task_id = source.removeprefix("builtin:")
    matches = [e for e in registry.entries() if e.task_id == task_id
               and registry.config(e.id).encoder.get("layer") is None]
    if matches:
        return _from_registry(registry, matches[0].id, source_options)
    return SourceChoice(load_task(source, **(source_options or {})))


def _from_recorded(config: ESMConfig, esm_id: str, options: dict[str, Any]) -> Task:
    """The source data of an ESM that recorded how to load it (``task_spec``)."""
    from stepstone.esm.specs import load_recorded

    spec = config.task_spec
    built = f" (data hash {config.task_data_hash})" if config.task_data_hash else ""
    fix = ("pass the source data as a task spec instead: --source FILE with "
           "--source-text-column/--source-label-column (API: source=path, source_options)")
    if "file" in spec and not Path(spec["file"]).is_file():
        raise DataError(f"ESM {esm_id!r} was built from {spec['file']!r}{built}, which is "
                        f"gone; put the file back there, or {fix}.")
    try:
        task = load_recorded(spec, **options)
    except DataError as err:
        where = (f"the Hub dataset {spec['hub']!r}" if "hub" in spec
                 else f"{spec.get('file') or spec.get('builtin')!r}")
        origin = (" (imported from hf-dataset-selector)"
                  if config.task_origin.startswith("hfselect") else "")
        raise DataError(f"ESM {esm_id!r}{origin} was trained on {where}, which cannot be "
                        f"loaded here: {err} To use it as a transfer source, {fix}.") from None
    if config.task_data_hash and task.data_hash() != config.task_data_hash:
        if "builtin" in spec:
            logger.warning("Source %s: the built-in data changed since ESM %s was built.",
                           task.task_id, esm_id)
        else:
            raise DataError(
                f"The data at {spec.get('file') or spec.get('hub')!r} changed since ESM "
                f"{esm_id!r} was built (data hash {task.data_hash()} now, "
                f"{config.task_data_hash} at the build); rebuild the ESM, or {fix}.")
    return task


def _from_registry(registry: Registry, esm_id: str,
                   options: dict[str, Any] | None = None) -> SourceChoice:
    # The config decides which data is read: trust it only when the ESM's files still
    # match the checksum recorded when it was added.
    config = registry.config(esm_id, verify=True)
    if config.task_spec:
        task = _from_recorded(config, esm_id, dict(options or {}))
        return SourceChoice(task, esm_id, model_dir=registry.model_dir(esm_id))
    from stepstone.esm.catalog import builtin_ids
    from stepstone.esm.data import FILE_SUFFIXES

    origin, builtin = config.task_origin, config.task_id in builtin_ids()
    # A recorded origin is reloaded only as a data file or Hub spec whose data hash
    # matches the build's; built-in tasks record a readable origin, not a loadable spec.
    loadable = origin.startswith("hub:") or (
        Path(origin).suffix.lower() in FILE_SUFFIXES and (not builtin or Path(origin).is_file()))
    task = None
    if loadable and config.task_data_hash:
        recorded = load_task(origin, **(options or {}))
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
