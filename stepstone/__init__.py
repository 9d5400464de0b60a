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
from finetune.executor import ExecutorSettings, make_executor
from finetune.kernel import (
    KernelReport,
    KernelSettings,
    compute_kernel,
    kernel_vs_finetune,
)
from finetune.train import FinetuneSettings, TaskModel, TrainingError, evaluate, finetune
from finetune.transfer import LRSearchSettings, TransferReport, TransferSettings, transfer
from selection.logme import LogME, logme_score
from selection.ranking import Ranking, rank
from selection.scorers import METHODS, available_methods, get_scorer, register_scorer

__all__ = [
    "__version__", "build_registry", "BuildReport", "BuildSettings", "builtin_ids",
    "catalog_table", "DataError", "DEFAULT_ENCODER", "default_registry_path", "EmbeddingCache",
    "EmbeddingSpaceMap", "Encoder", "EncoderMismatchError", "ESMConfig", "ESMFitSettings",
    "evaluate", "finetune", "FinetuneSettings", "fit_esm", "get_scorer", "import_hfselect",
    "load_builtin", "load_encoder", "load_file", "load_task", "LogME", "logme_score", "make_task",
    "METHODS", "open_registry", "rank", "Ranking", "read_hfselect_esm", "Registry",
    "RegistryError", "Split", "Task", "TaskModel", "TrainingError", "transfer",
    "TransferReport", "TransferSettings", "LRSearchSettings", "available_methods",
    "compute_kernel", "KernelReport", "KernelSettings", "kernel_vs_finetune", "register_scorer",
    "ExecutorSettings", "make_executor",
]
