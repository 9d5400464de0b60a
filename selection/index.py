"""FAISS indexes kept next to the registry: the first stage of a ranking.

Two indexes, one class (:class:`TaskIndex`):

- the **ESM sketch index** (``esm_index.*``): one vector per affine ESM, its Gram
  ``Wt^T Wt`` compressed to a fixed basis (:mod:`stepstone.selection.sketch`), so that
  the inner product with a target's query vector is the first-order model of that
  ESM's ESM-LogME score. ``rank(prefilter=K)`` keeps the ``K`` best sources of this
  search, which ESM-LogME then scores exactly; ESMs without a sketch (non-affine maps)
  are always kept.
- the **TextEmb index** (``index.*``): each source's L2-normalised mean base embedding
  (stored in the registry row at build time); the inner product with the target's
  normalised mean is TextEmb's cosine (Vu et al. 2020).

Files in the registry folder: ``<name>.faiss`` and ``<name>.json`` (the registry
generation it reflects, the vector dimension and the id <-> label map), and for the
sketch index ``esm_index.basis.safetensors``. An index is brought up to date
incrementally (``remove_ids``/``add_with_ids``; only new ESMs are read) whenever the
registry's generation moved on. Search loads the flat codes memory-mapped
(``IO_FLAG_MMAP_IFC``), so a ranking's memory does not grow with the index file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from stepstone.esm.atomic import atomic_path, write_text_atomic
from stepstone.esm.registry import Registry, RegistryEntry
from stepstone.selection.sketch import (
    DEFAULT_SKETCH_RANK,
    SketchBasis,
    fit_sketch_basis,
    middle_stage_pool,
    sketch_logme,
    sketch_maps,
    target_query,
)
from stepstone.selection.threads import single_threaded_blas

logger = logging.getLogger(__name__)

INDEX_NAME = "index"  # TextEmb task vectors
SKETCH_INDEX_NAME = "esm_index"  # ESM sketches
INDEX_FILE = f"{INDEX_NAME}.faiss"
INDEX_META = f"{INDEX_NAME}.json"
SKETCH_FILE = f"{SKETCH_INDEX_NAME}.faiss"
SKETCH_META = f"{SKETCH_INDEX_NAME}.json"
SKETCH_BASIS = f"{SKETCH_INDEX_NAME}.basis.safetensors"
HNSW_THRESHOLD = 1_000_000  # flat search is exact and takes milliseconds below this
BASIS_SAMPLE = 2000  # most ESMs read to fit a fresh sketch basis
SKETCH_BATCH = 256  # ESMs read and sketched at a time while (re)building


def label_of(esm_id: str) -> int:
    """Stable 63-bit FAISS label of an ESM id."""
    return int.from_bytes(hashlib.blake2b(esm_id.encode(), digest_size=8).digest(), "big") >> 1


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class TaskIndex:
    """Inner-product FAISS index of vectors keyed by ESM id.

    Parameters
    ----------
    dim : int
        Vector dimension.
    kind : {'flat', 'hnsw'}
        ``flat`` is exact; ``hnsw`` (M=32) is approximate, for very large registries.
    normalized : bool
        L2-normalise vectors and queries (cosine; the TextEmb index). The sketch index
        keeps raw inner products.
    """

    def __init__(self, dim: int, *, kind: str = "flat", normalized: bool = True) -> None:
        import faiss

        if kind not in ("flat", "hnsw"):
            raise ValueError(f"'kind' must be one of ['flat', 'hnsw']; got {kind!r}.")
        self.dim, self.kind, self.normalized = dim, kind, normalized
        base = (faiss.IndexFlatIP(dim) if kind == "flat"
                else faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT))
        self.index = faiss.IndexIDMap2(base)
        self.ids: dict[int, str] = {}
        self.generation = -1
        self.mapped = False  # a memory-mapped index is searched only, never changed

    def __len__(self) -> int:
        return self.index.ntotal

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        return normalize(vectors) if self.normalized else np.ascontiguousarray(vectors)

    def add(self, esm_ids: list[str], vectors: np.ndarray) -> None:
        """Add vectors (n, dim), L2-normalised first when the index is ``normalized``."""
        if not esm_ids:
            return
        if self.mapped:
            raise ValueError("A memory-mapped index is read-only; load it with mmap=False.")
        vectors = self._prepare(vectors)
        if vectors.shape != (len(esm_ids), self.dim):
            raise ValueError(f"Expected vectors of shape ({len(esm_ids)}, {self.dim}); got "
                             f"{vectors.shape}.")
        labels = np.array([label_of(i) for i in esm_ids], dtype=np.int64)
        self.index.add_with_ids(vectors, labels)
        self.ids.update(zip(labels.tolist(), esm_ids, strict=True))

    def remove(self, esm_ids: list[str]) -> None:
        if not esm_ids:
            return
        if self.mapped:
            raise ValueError("A memory-mapped index is read-only; load it with mmap=False.")
        if self.kind == "hnsw":
            raise ValueError("HNSW indexes cannot remove vectors; rebuild instead.")
        labels = np.array([label_of(i) for i in esm_ids], dtype=np.int64)
        self.index.remove_ids(labels)
        for lab in labels.tolist():
            self.ids.pop(lab, None)

    def search(self, query: np.ndarray, k: int, *, among: Iterable[str] | None = None
               ) -> list[tuple[str, float]]:
        """The ``k`` ids with the largest inner product with ``query`` (dim,), best first,
        with that inner product (the cosine for a ``normalized`` index).

        ``among``: search only these ids (a candidate subset, e.g. after filters); ids
        not in the index are ignored.
        """
        import faiss

        if len(self) == 0 or k < 1:
            return []
        q = np.asarray(query, np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"Query has dimension {q.shape[1]}; the index holds {self.dim}.")
        q = self._prepare(q)
        params, total = None, len(self)
        if among is not None:
            labels = np.array([lab for lab in (label_of(i) for i in among) if lab in self.ids],
                              dtype=np.int64)
            if labels.size == 0:
                return []
            selector = faiss.IDSelectorBatch(labels)
            params = (faiss.SearchParametersHNSW(sel=selector) if self.kind == "hnsw"
                      else faiss.SearchParameters(sel=selector))
            total = labels.size
        scores, labels = self.index.search(q, min(k, total), params=params)
        return [(self.ids[int(lab)], float(s)) for s, lab in zip(scores[0], labels[0],
                                                                  strict=True) if lab >= 0]

    def vector(self, esm_id: str) -> np.ndarray:
        """The stored (normalised) vector of one id."""
        return self.index.reconstruct(label_of(esm_id))

    # -- persistence ------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"generation": self.generation, "dim": self.dim, "kind": self.kind,
                "normalized": self.normalized,
                "ids": {str(k): v for k, v in self.ids.items()}}

    def save(self, folder: Path, name: str = INDEX_NAME) -> None:
        """Write ``<name>.faiss`` and ``<name>.json``, each atomically (temp file + rename);
        the JSON last, so a reader that finds it current finds the matching vectors."""
        import faiss

        with atomic_path(folder / f"{name}.faiss") as tmp:
            faiss.write_index(self.index, str(tmp))
        write_text_atomic(folder / f"{name}.json", json.dumps(self._meta()))

    @classmethod
    def load(cls, folder: Path, name: str = INDEX_NAME, *, mmap: bool = False
             ) -> TaskIndex | None:
        """The stored index, or None if absent or unreadable (it is derived data).

        ``mmap``: memory-map the vectors (search only; FAISS refuses to change them)."""
        import faiss

        path, meta_path = folder / f"{name}.faiss", folder / f"{name}.json"
        if not (path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except (OSError, RuntimeError, json.JSONDecodeError) as err:
            logger.warning("Ignoring unreadable index %s in %s (%s); rebuilding.", name,
                           folder, err)
            return None
        obj = cls.__new__(cls)
        obj.dim, obj.kind, obj.index = meta["dim"], meta["kind"], index
        obj.normalized = meta.get("normalized", True)
        obj.ids = {int(k): v for k, v in meta["ids"].items()}
        obj.generation = meta["generation"]
        obj.mapped = mmap
        if obj.index.ntotal != len(obj.ids) or obj.index.d != obj.dim:
            logger.warning("Index %s in %s disagrees with its id map; rebuilding.", name,
                           folder)
            return None
        return obj


class SketchIndex(TaskIndex):
    """The ESM sketch index: a :class:`TaskIndex` of raw inner products plus the fixed
    :class:`~stepstone.selection.sketch.SketchBasis` its vectors were made with."""

    def __init__(self, basis: SketchBasis, *, kind: str = "flat") -> None:
        super().__init__(basis.dim, kind=kind, normalized=False)
        self.basis = basis

    def query(self, features: np.ndarray, labels: np.ndarray, *,
              label_kind: str = "classification") -> np.ndarray:
        return target_query(self.basis, features, labels, label_kind=label_kind)

    def save(self, folder: Path, name: str = SKETCH_INDEX_NAME) -> None:
        from safetensors.numpy import save

        # bytes written by Python, so the file gets the umask's mode like the index's
        # other files (safetensors' save_file creates it 0600)
        with atomic_path(folder / SKETCH_BASIS) as tmp:
            tmp.write_bytes(save({"basis": self.basis.basis, "center": self.basis.center}))
        super().save(folder, name)

    @classmethod
    def load(cls, folder: Path, name: str = SKETCH_INDEX_NAME, *, mmap: bool = False
             ) -> SketchIndex | None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if not (folder / SKETCH_BASIS).exists():
            return None
        obj = super().load(folder, name, mmap=mmap)
        if obj is None:
            return None
        try:
            arrays = load_file(str(folder / SKETCH_BASIS))
            obj.basis = SketchBasis(arrays["basis"], arrays["center"])
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            logger.warning("Ignoring unreadable sketch basis in %s (%s); rebuilding.", folder,
                           err)
            return None
        if obj.basis.dim != obj.dim:
            return None
        return obj  # type: ignore[return-value]


# ----------------------------------------------------------------------- TextEmb index
def _indexable(entries: list[RegistryEntry]) -> list[RegistryEntry]:
    return [e for e in entries if e.task_vector is not None]


def build_index(registry: Registry) -> TaskIndex:
    """A fresh TextEmb index over every registry entry that has a task vector."""
    entries = _indexable(registry.entries())
    dim = entries[0].task_vector.shape[0] if entries else 1
    index = TaskIndex(dim, kind="hnsw" if len(entries) > HNSW_THRESHOLD else "flat")
    index.add([e.id for e in entries], np.stack([e.task_vector for e in entries])
              if entries else np.zeros((0, dim), np.float32))
    index.generation = registry.generation
    return index


def task_index(registry: Registry, *, save: bool = True) -> TaskIndex:
    """The registry's TextEmb index, updated incrementally if the registry changed.

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


# ------------------------------------------------------------------- ESM sketch index
def _read_affine(registry: Registry, entry: RegistryEntry
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W, b)`` float32 of an affine ESM straight from its safetensors file (about 20x
    faster than building the torch module; the index is derived data, and exact scoring
    still loads through :meth:`Registry.load_esm` with its checks)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from stepstone.esm.model import WEIGHTS_NAME, ESMFormatError

    path = registry.esm_dir(entry.id) / WEIGHTS_NAME
    try:
        t = load_file(str(path))
    except SafetensorError as err:
        raise ESMFormatError(f"{path} is not readable safetensors ({err}).") from None
    if entry.architecture == "linear" and {"linear.weight", "linear.bias"} <= set(t):
        W, b = t["linear.weight"], t["linear.bias"]
    elif entry.architecture == "lowrank" and {"up.weight", "down.weight", "up.bias"} <= set(t):
        W = np.eye(entry.in_dim, dtype=np.float32) + t["up.weight"] @ t["down.weight"]
        b = t["up.bias"]
    else:
        pair = registry.load_esm(entry.id, verify=False).affine()
        return None if pair is None else (pair[0].astype(np.float32),
                                          pair[1].astype(np.float32))
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise ESMFormatError(f"ESM {entry.id!r} has non-finite weights.")
    return W.astype(np.float32, copy=False), b.astype(np.float32, copy=False)


def _affine_maps(registry: Registry, entries: list[RegistryEntry]
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, weights (B, d_out, d) and biases (B, d_out) of the affine ESMs among
    ``entries``; the others (non-affine maps, unreadable folders) are logged and left
    out, so the first stage passes them through unfiltered."""
    from stepstone.selection.scorers import _PER_ESM_ERRORS

    ids, ws, bs = [], [], []
    for e in entries:
        try:
            pair = _read_affine(registry, e)
        except _PER_ESM_ERRORS as err:
            logger.warning("ESM %s is not sketched (%s: %s); rank keeps it unfiltered.",
                           e.id, type(err).__name__, err)
            continue
        if pair is None:
            continue
        ids.append(e.id)
        ws.append(pair[0])
        bs.append(pair[1])
    if not ids:
        return [], np.zeros((0, 1, 1)), np.zeros((0, 1))
    return ids, np.stack(ws), np.stack(bs)


def _sketch_into(index: SketchIndex, registry: Registry, entries: list[RegistryEntry]) -> int:
    # One BLAS thread: a sketch is one small matrix product per map (see threads).
    with single_threaded_blas():
        return _sketch_batches(index, registry, entries)


def _sketch_batches(index: SketchIndex, registry: Registry, entries: list[RegistryEntry]
                    ) -> int:
    added = 0
    for start in range(0, len(entries), SKETCH_BATCH):
        ids, W, b = _affine_maps(registry, entries[start:start + SKETCH_BATCH])
        if ids:
            keep = [i for i, w in zip(ids, W, strict=True)
                    if w.shape[1] + 1 == index.basis.basis.shape[0]]
            if len(keep) != len(ids):
                sel = [j for j, i in enumerate(ids) if i in set(keep)]
                W, b = W[sel], b[sel]
            index.add(keep, sketch_maps(index.basis, W, b))
            added += len(keep)
    return added


def _sketchable(registry: Registry) -> list[RegistryEntry]:
    from stepstone.esm.model import AFFINE_ARCHITECTURES

    return [e for e in registry.entries() if e.architecture in AFFINE_ARCHITECTURES]


def build_sketch_index(registry: Registry, *, rank: int = DEFAULT_SKETCH_RANK,
                       seed: int = 0) -> SketchIndex:
    """A fresh ESM sketch index over the registry's affine ESMs of its most common input
    dimension. The basis is fitted on up to ``BASIS_SAMPLE`` of them (seeded sample)."""
    entries = _sketchable(registry)
    if entries:
        dims = [e.in_dim for e in entries]
        common = max(set(dims), key=dims.count)
        entries = [e for e in entries if e.in_dim == common]
    rng = np.random.default_rng(seed)
    sample = (entries if len(entries) <= BASIS_SAMPLE else
              [entries[i] for i in sorted(rng.choice(len(entries), BASIS_SAMPLE,
                                                     replace=False))])
    _, W, b = _affine_maps(registry, sample)
    if len(W) == 0:
        dim = entries[0].in_dim if entries else 1
        basis = SketchBasis(np.eye(dim + 1, min(rank, dim + 1)), np.eye(min(rank, dim + 1)))
    else:
        with single_threaded_blas():  # per-map products: see _sketch_into
            basis = fit_sketch_basis(W, b, rank=rank)
    del W, b
    index = SketchIndex(basis)
    _sketch_into(index, registry, entries)
    index.generation = registry.generation
    return index


def sketch_index(registry: Registry, *, save: bool = True, mmap: bool = True) -> SketchIndex:
    """The registry's ESM sketch index, updated incrementally if the registry changed
    (only added ESMs are read; the basis stays the one the index was built with).

    A current stored index is returned memory-mapped (``mmap``); a read-only registry
    whose stored index is stale gets an in-memory update.
    """
    index = SketchIndex.load(registry.path, mmap=mmap)
    if index is not None and index.generation == registry.generation:
        return index
    if index is not None and index.mapped:
        index = SketchIndex.load(registry.path, mmap=False)
    if index is None or index.kind == "hnsw":
        index = build_sketch_index(registry)
    else:
        current = {e.id: e for e in _sketchable(registry)}
        stale = [i for i in index.ids.values() if i not in current]
        new = [e for i, e in current.items() if label_of(i) not in index.ids]
        index.remove(stale)
        added = _sketch_into(index, registry, new)
        index.generation = registry.generation
        logger.info("ESM sketch index: removed %d, added %d.", len(stale), added)
    if save and not registry.readonly:
        index.save(registry.path)
    return index


def update_indexes(registry: Registry) -> None:
    """Bring both stored indexes up to date with a writable registry (after a build or
    an import), so the next ranking does not pay for it."""
    task_index(registry)
    sketch_index(registry, mmap=False)


def check_indexes(registry: Registry) -> list[str]:
    """Problems where a stored index disagrees with the manifest (for ``registry
    verify``): a current index (same generation) must hold exactly the manifest's
    indexable ids. A stale or absent index is not a problem: the next ranking or
    writer updates it."""
    problems = []
    from stepstone.esm.model import AFFINE_ARCHITECTURES

    entries = registry.entries()
    expected = {
        INDEX_NAME: {e.id for e in entries if e.task_vector is not None},
        SKETCH_INDEX_NAME: {e.id for e in entries if e.architecture in AFFINE_ARCHITECTURES},
    }
    for name, want in expected.items():
        meta_path = registry.path / f"{name}.json"
        if not meta_path.exists():
            continue
        try:
            meta = json.loads(meta_path.read_text())
            ids = {v for k, v in meta["ids"].items() if label_of(v) == int(k)}
            bad_labels = len(meta["ids"]) - len(ids)
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"{meta_path.name}: unreadable ({err}); it is rebuilt on the next "
                            "ranking")
            continue
        if bad_labels:
            problems.append(f"{meta_path.name}: {bad_labels} label(s) do not match their id")
        if meta.get("generation") != registry.generation:
            continue
        cls = SketchIndex if name == SKETCH_INDEX_NAME else TaskIndex
        stored = cls.load(registry.path, name, mmap=True)
        if stored is None:
            problems.append(f"{name}.faiss: unreadable or disagrees with {meta_path.name}")
            continue
        if isinstance(stored, SketchIndex):  # only maps of the basis' input dimension
            want = {e.id for e in entries if e.id in want and e.in_dim == stored.basis.in_dim}
        missing, extra = sorted(want - ids), sorted(ids - want)
        if missing:
            problems.append(f"{name}: {len(missing)} ESM(s) of the manifest missing from the "
                            f"index at the same generation: {', '.join(missing[:5])}")
        if extra:
            problems.append(f"{name}: {len(extra)} id(s) in the index but not in the "
                            f"manifest: {', '.join(extra[:5])}")
    return problems


def first_stage(registry: Registry, features: np.ndarray, labels: np.ndarray,
                entries: list[RegistryEntry], k: int, *, label_kind: str = "classification"
                ) -> list[RegistryEntry]:
    """:func:`first_stage_ids` on entries: the kept entries, in its order."""
    by_id = {e.id: e for e in entries}
    return [by_id[i] for i in first_stage_ids(registry, features, labels, list(by_id), k,
                                              label_kind=label_kind)]


def first_stage_ids(registry: Registry, features: np.ndarray, labels: np.ndarray,
                    esm_ids: list[str], k: int, *, label_kind: str = "classification"
                    ) -> list[str]:
    """The ``k`` candidates among ``esm_ids`` that the ESM sketch index scores highest
    for a target (features (n, d), labels (n,)), best first; then every candidate the
    index does not hold (non-affine or unreadable ESMs, another input dimension), so
    none is dropped unscored.

    The inner-product search keeps a pool of candidates (``middle_stage_pool``), which
    :func:`~stepstone.selection.sketch.sketch_logme` rescores from their sketches (no
    ESM weights read) to keep the ``k``. The search runs over the candidate subset
    only (FAISS ``IDSelectorBatch``), so filters and the target's exclusion never cost
    a slot. Takes ids, not registry rows: nothing is read per candidate.
    """
    if k < 1:
        raise ValueError(f"'k' must be >= 1; got {k}.")
    index = sketch_index(registry)
    in_index = set(index.ids.values())  # a set of ids: no label hashed per candidate
    held = [i for i in esm_ids if i in in_index]
    best: list[tuple[str, float]] = []
    if held and features.shape[1] == index.basis.in_dim:
        with single_threaded_blas():  # small factorisations: see _sketch_into
            query = index.query(features, labels, label_kind=label_kind)
        # every indexed ESM a candidate (no filter, no exclusion): no id selector needed
        pool = [i for i, _ in index.search(
            query, middle_stage_pool(labels, k, label_kind=label_kind),
            among=None if len(held) == len(index) else held)]
        if pool:  # middle stage: LogME on the basis projection, from the stored sketches
            scores = sketch_logme(index.basis, features, labels,
                                  np.stack([index.vector(i) for i in pool]),
                                  label_kind=label_kind)
            best = [(pool[j], float(scores[j])) for j in np.argsort(-scores, kind="stable")[:k]]
    elif held:
        logger.warning("The ESM sketch index holds %d-d maps; the target is %d-d: no "
                       "first stage.", index.basis.in_dim, features.shape[1])
        return list(esm_ids)
    indexed = set(held)
    unindexed = [i for i in esm_ids if i not in indexed]
    if unindexed:
        logger.info("First stage: %d candidate(s) without a sketch are kept: %s",
                    len(unindexed), ", ".join(unindexed[:5]))
    return [i for i, _ in best] + unindexed
