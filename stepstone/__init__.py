"""stepstone: pick the intermediate task to fine-tune on first, and carry it through.

The public Python API. The layers install as subpackages (``stepstone.esm`` ←
``stepstone.selection`` ← ``stepstone.finetune``); the names below are re-exported
from them on first use, so ``import stepstone`` stays light and importing a layer
never pulls in the ones above it. Everything else stays importable from its
subpackage. The CLI (``stepstone ...``) is built on exactly these functions.
"""

from __future__ import annotations

import importlib
from typing import Any

from stepstone.esm import __version__

# public name -> defining module (relative to this package)
_EXPORTS: dict[str, str] = {
    # tasks and data
    "Task": "esm.data", "Split": "esm.data", "DataError": "esm.data",
    "load_task": "esm.specs", "load_file": "esm.data", "make_task": "esm.data",
    "load_builtin": "esm.catalog", "builtin_ids": "esm.catalog", "catalog_table": "esm.catalog",
    # encoders and ESMs
    "Encoder": "esm.encoder", "load_encoder": "esm.encoder", "DEFAULT_ENCODER": "esm.encoder",
    "EncoderMismatchError": "esm.encoder", "EmbeddingCache": "esm.cache",
    "EmbeddingSpaceMap": "esm.model", "ESMConfig": "esm.model", "ESMFitSettings": "esm.model",
    "fit_esm": "esm.model", "import_hfselect": "esm.hfselect",
    "import_from_hub": "esm.hub", "find_hub_esms": "esm.hub",
    "export_hfselect": "esm.hfselect_export", "CandidateFilter": "esm.filters",
    # the registry
    "Registry": "esm.registry", "RegistryError": "esm.registry",
    "open_registry": "esm.registry", "default_registry_path": "esm.registry",
    # selection
    "rank": "selection.ranking", "Ranking": "selection.ranking",
    "LogME": "selection.logme", "logme_score": "selection.logme",
    "GainModel": "selection.gain", "fit_gain_model": "selection.gain",
    "load_gain_model": "selection.gain", "Recommendation": "selection.gain",
    "NoSourceRecommended": "selection.gain", "fit_from_matrix": "selection.gain_fit",
    # building, fine-tuning and transfer
    "build_registry": "finetune.build", "BuildSettings": "finetune.build",
    "BuildReport": "finetune.build", "FinetuneSettings": "finetune.train",
    "TaskModel": "esm.taskmodel", "TrainingError": "finetune.train",
    "evaluate": "finetune.train",
    "transfer": "finetune.transfer", "TransferSettings": "finetune.transfer",
    "LeakageError": "finetune.transfer",
    "TransferReport": "finetune.transfer_report", "LRSearchSettings": "finetune.transfer",
    "compute_kernel": "selection.entk", "kernel_vs_finetune": "finetune.kernel",
    "KernelSettings": "selection.entk_solvers", "KernelReport": "finetune.kernel",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stepstone' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stepstone.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
