"""stepstone: pick the intermediate task to fine-tune on first, and carry it through.

The public Python API, re-exported from the layered packages (esm ← selection ←
finetune). The CLI (``stepstone ...``) is built on exactly these functions.
"""

from esm import __version__
from esm.cache import EmbeddingCache
from esm.catalog import builtin_ids, catalog_table, load_builtin
from esm.data import DataError, Split, Task, load_file, load_task, make_task
from esm.encoder import DEFAULT_ENCODER, Encoder, EncoderMismatchError, load_encoder
from esm.hfselect import import_hfselect, read_hfselect_esm
from esm.model import EmbeddingSpaceMap, ESMConfig, ESMFitSettings, fit_esm
from esm.registry import Registry, RegistryError, default_registry_path, open_registry
from finetune.build import BuildReport, BuildSettings, build_registry
from finetune.train import FinetuneSettings, TaskModel, TrainingError, evaluate, finetune

__all__ = [
    "DEFAULT_ENCODER", "BuildReport", "BuildSettings", "DataError", "EmbeddingCache",
    "EmbeddingSpaceMap", "Encoder", "EncoderMismatchError", "ESMConfig", "ESMFitSettings",
    "FinetuneSettings", "Registry", "RegistryError", "Split", "Task", "TaskModel",
    "TrainingError", "__version__", "build_registry", "builtin_ids", "catalog_table",
    "default_registry_path", "evaluate", "finetune", "fit_esm", "import_hfselect",
    "load_builtin", "load_encoder", "load_file", "load_task", "make_task", "open_registry",
    "read_hfselect_esm",
]
