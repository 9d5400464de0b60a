"""FAISS index over per-source task vectors, kept next to the registry.

Each source's task vector is the L2-normalised mean of its training texts' base
embeddings (stored in the registry row at build time), so the inner product
with a target's normalised mean embedding is TextEmb's cosine (Vu et al. 2020).
``prefilter`` retrieves the K nearest sources, which ESM-LogME then reranks, so
ranking cost stops growing with the registry size.

Files in the registry folder: ``index.faiss`` and ``index.json`` (the registry
generation it reflects, the vector dimension and the id ↔ label map). The index
is brought up to date incrementally (``remove_ids``/``add_with_ids``) whenever
the registry's generation moved on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from stepstone.esm.atomic import atomic_path, write_text_atomic
from stepstone.esm.registry import Registry, RegistryEntry

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
HNSW_THRESHOLD = 1_000_000  # flat search is exact and takes milliseconds below this


def label_of(esm_id: str) -> int:
    """Stable 63-bit FAISS label of an ESM id."""
    return int.from_bytes(hashlib.blake2b(esm_id.encode(), digest_size=8).digest(), "big") >> 1


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class TaskIndex:
    """Inner-product FAISS index of task vectors keyed by ESM id.

    Parameters
    ----------
    dim : int
        Task vector dimension.
    kind : {'flat', 'hnsw'}
        ``flat`` is exact; ``hnsw`` (M=32) is approximate, for very large registries.
    """

    def __init__(self, dim: int, *, kind: str = "flat") -> None:
        import faiss

        if kind not in ("flat", "hnsw"):
            raise ValueError(f"'kind' must be one of ['flat', 'hnsw']; got {kind!r}.")
        self.dim, self.kind = dim, kind
        base = (faiss.IndexFlatIP(dim) if kind == "flat"
                else faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT))
        self.index = faiss.IndexIDMap2(base)
        self.ids: dict[int, str] = {}
        self.generation = -1

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, esm_ids: list[str], vectors: np.ndarray) -> None:
        """Add task vectors (n, dim); they are L2-normalised here."""
        if not esm_ids:
            return
        vectors = normalize(vectors)
        if vectors.shape != (len(esm_ids), self.dim):
            raise ValueError(f"Expected vectors of shape ({len(esm_ids)}, {self.dim}); got "
                             f"{vectors.shape}.")
        labels = np.array([label_of(i) for i in esm_ids], dtype=np.int64)
        self.index.add_with_ids(vectors, labels)
        self.ids.update(zip(labels.tolist(), esm_ids, strict=True))

    def remove(self, esm_ids: list[str]) -> None:
        if not esm_ids:
            return
        if self.kind == "hnsw":
            raise ValueError("HNSW indexes cannot remove vectors; rebuild instead.")
        labels = np.array([label_of(i) for i in esm_ids], dtype=np.int64)
        self.index.remove_ids(labels)
        for lab in labels.tolist():
            self.ids.pop(lab, None)

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` nearest ESM ids to ``query`` (dim,) with their cosine similarity."""
        if len(self) == 0 or k < 1:
            return []
        q = normalize(np.asarray(query, np.float32).reshape(1, -1))
        if q.shape[1] != self.dim:
            raise ValueError(f"Query has dimension {q.shape[1]}; the index holds {self.dim}.")
        scores, labels = self.index.search(q, min(k, len(self)))
        return [(self.ids[int(lab)], float(s)) for s, lab in zip(scores[0], labels[0],
                                                                  strict=True) if lab >= 0]

    # -- persistence ------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write index.faiss and index.json, each atomically (temp file + rename)."""
        import faiss

        with atomic_path(folder / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        write_text_atomic(folder / INDEX_META, json.dumps(
            {"generation": self.generation, "dim": self.dim, "kind": self.kind,
             "ids": {str(k): v for k, v in self.ids.items()}}))

    @classmethod
    def load(cls, folder: Path) -> TaskIndex | None:
        """The stored index, or None if absent or unreadable (it is derived data)."""
        import faiss

        path, meta_path = folder / INDEX_FILE, folder / INDEX_META
        if not (path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            index = faiss.read_index(str(path))
        except (OSError, RuntimeError, json.JSONDecodeError) as err:
            logger.warning("Ignoring unreadable task index in %s (%s); rebuilding.", folder, err)
            return None
        obj = cls.__new__(cls)
        obj.dim, obj.kind, obj.index = meta["dim"], meta["kind"], index
        obj.ids = {int(k): v for k, v in meta["ids"].items()}
        obj.generation = meta["generation"]
        if obj.index.ntotal != len(obj.ids):
            logger.warning("Task index in %s disagrees with its id map; rebuilding.", folder)
            return None
        return obj


def _indexable(entries: list[RegistryEntry]) -> list[RegistryEntry]:
    return [e for e in entries if e.task_vector is not None]


def build_index(registry: Registry) -> TaskIndex:
    """A fresh index over every registry entry that has a task vector."""
    entries = _indexable(registry.entries())
    dim = entries[0].task_vector.shape[0] if entries else 1
    index = TaskIndex(dim, kind="hnsw" if len(entries) > HNSW_THRESHOLD else "flat")
    index.add([e.id for e in entries], np.stack([e.task_vector for e in entries])
              if entries else np.zeros((0, dim), np.float32))
    index.generation = registry.generation
    return index


def task_index(registry: Registry, *, save: bool = True) -> TaskIndex:
    """The registry's task index, updated incrementally if the registry changed.

    A read-only registry whose stored index is stale gets an in-memory update.
    """
    index = TaskIndex.load(registry.path)
    if index is not None and index.generation == registry.generation:
        return index
    entries = _indexable(registry.entries())
    if index is None or index.kind == "hnsw" or (
            entries and entries[0].task_vector.shape[0] != index.dim):
        index = build_index(registry)
    else:
        current = {e.id: e for e in entries}
        stale = [i for i in index.ids.values() if i not in current]
        new = [e for i, e in current.items() if label_of(i) not in index.ids]
        index.remove(stale)
        index.add([e.id for e in new], np.stack([e.task_vector for e in new])
                  if new else np.zeros((0, index.dim), np.float32))
        index.generation = registry.generation
        logger.info("Task index: removed %d, added %d.", len(stale), len(new))
    if save and not registry.readonly:
        index.save(registry.path)
    return index
