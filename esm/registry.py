"""The ESM registry: a folder with ``registry.sqlite`` and one folder per ESM.

Layout::

    registry.sqlite          one row per ESM (id, task, encoder, dims, sizes, checksum, ...)
    esms/<id>/config.json    the ESM (see stepstone.esm.model)
    esms/<id>/model.safetensors
    esms/<id>/profile.json   source profile: token counts for vocabulary overlap
    models/<id>/             optional: the fine-tuned source encoder + head
    .staging/                half-written additions; never read

Writes are atomic: an ESM is written to ``.staging``, fsynced, recorded as
*pending* in SQLite, renamed into ``esms/`` and then moved from pending to the
main table in one transaction. Opening a registry for writing finishes or undoes
whatever a killed process left, so an interrupted build loses nothing already
added and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from stepstone.esm.encoder import EncoderIdentity, EncoderMismatchError
from stepstone.esm.errors import StepstoneError
from stepstone.esm.model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    EmbeddingSpaceMap,
    ESMConfig,
    ESMFormatError,
)

logger = logging.getLogger(__name__)

DB_NAME = "registry.sqlite"
ESM_DIR = "esms"
MODEL_DIR = "models"
STAGING_DIR = ".staging"
PROFILE_NAME = "profile.json"
REGISTRY_FORMAT = 1

_COLUMNS = (
    "id", "task_id", "base_model", "fingerprint", "pooling", "max_length", "layer", "in_dim",
    "out_dim", "architecture", "num_examples", "label_kind", "num_classes", "settings_key",
    "checksum", "size_bytes", "has_model", "created", "task_vector",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS esms (
    id TEXT PRIMARY KEY, task_id TEXT NOT NULL, base_model TEXT NOT NULL,
    fingerprint TEXT NOT NULL, pooling TEXT NOT NULL, max_length INTEGER NOT NULL,
    layer INTEGER, in_dim INTEGER NOT NULL, out_dim INTEGER NOT NULL,
    architecture TEXT NOT NULL, num_examples INTEGER NOT NULL, label_kind TEXT NOT NULL,
    num_classes INTEGER NOT NULL, settings_key TEXT NOT NULL, checksum TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, has_model INTEGER NOT NULL, created TEXT NOT NULL,
    task_vector BLOB
);
CREATE INDEX IF NOT EXISTS esms_settings ON esms (settings_key);
CREATE TABLE IF NOT EXISTS pending ({", ".join(c + " " for c in _COLUMNS)[:-1]});
"""


class RegistryError(StepstoneError, RuntimeError):
    """The registry is missing, corrupt or inconsistent, or an id is unknown."""


@dataclass(frozen=True)
class RegistryEntry:
    """One registry row."""

    id: str
    task_id: str
    base_model: str
    fingerprint: str
    pooling: str
    max_length: int
    layer: int | None
    in_dim: int
    out_dim: int
    architecture: str
    num_examples: int
    label_kind: str
    num_classes: int
    settings_key: str
    checksum: str
    size_bytes: int
    has_model: bool
    created: str
    task_vector: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def encoder_identity(self) -> EncoderIdentity:
        return EncoderIdentity(self.base_model, self.fingerprint, self.pooling, self.max_length,
                               self.layer, self.in_dim)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("task_vector")
        return d


@dataclass
class VerifyReport:
    """Result of :meth:`Registry.verify`: ``ok`` iff ``problems`` is empty."""

    checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.checked} ESMs, every checksum matches, rows and files agree."
        return f"{len(self.problems)} problem(s) in {self.checked} ESMs:\n" + "\n".join(
            f"  - {p}" for p in self.problems)


def folder_checksum(folder: Path) -> tuple[str, int]:
    """SHA-256 over the folder's files (sorted relative paths and bytes) and their total size."""
    h = hashlib.sha256()
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        h.update(rel.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                total += len(chunk)
        h.update(b"\0")
    return h.hexdigest(), total


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _row_to_entry(row: sqlite3.Row | tuple) -> RegistryEntry:
    values = dict(zip(_COLUMNS, row, strict=True))
    blob = values.pop("task_vector")
    vec = None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()
    values["has_model"] = bool(values["has_model"])
    return RegistryEntry(**values, task_vector=vec)


class Registry:
    """An ESM registry on disk.

    Parameters
    ----------
    path : str or Path
        The registry folder.
    create : bool
        Create an empty registry when the folder holds none.
    readonly : bool
        Open without writing (the shipped default registry is opened this way).
    """

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        db = self.path / DB_NAME
        if not db.exists():
            if not create:
                raise RegistryError(
                    f"No registry at {str(self.path)!r} (expected {DB_NAME} there). Build one "
                    "with `stepstone registry build --registry DIR ...`."
                )
            if readonly:
                raise RegistryError("Cannot create a registry read-only.")
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            if readonly:
                self._conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            else:
                self._conn = sqlite3.connect(db, timeout=60)
                self._conn.executescript(_SCHEMA)
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('format_version', ?)",
                    (str(REGISTRY_FORMAT),))
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')")
                self._conn.commit()
            tables = {r[0] for r in self._conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as err:
            raise RegistryError(
                f"{db} is not a readable stepstone registry database ({err}).") from None
        if not {"esms", "meta", "pending"} <= tables:
            raise RegistryError(f"{db} lacks the 'esms'/'meta'/'pending' tables; it is not a "
                                "stepstone registry.")
        if not readonly:
            self._recover()

    # -- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM esms").fetchone()[0]

    def __contains__(self, esm_id: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM esms WHERE id = ?", (esm_id,)).fetchone()
        return row is not None

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(self.entries())

    def entries(self) -> list[RegistryEntry]:
        """All rows, ordered by task id then id."""
        rows = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM esms ORDER BY task_id, id")
        return [_row_to_entry(r) for r in rows]

    def get(self, esm_id: str) -> RegistryEntry:
        row = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM esms WHERE id = ?",
                                 (esm_id,)).fetchone()
        if row is None:
            raise RegistryError(f"No ESM {esm_id!r} in registry {str(self.path)!r}; it has "
                                f"{len(self)} ESMs (see `stepstone registry list`).")
        return _row_to_entry(row)

    def find(self, settings_key: str) -> RegistryEntry | None:
        """The entry built with exactly these settings, if any."""
        row = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM esms WHERE settings_key = ?",
                                 (settings_key,)).fetchone()
        return None if row is None else _row_to_entry(row)

    def esm_dir(self, esm_id: str) -> Path:
        return self.path / ESM_DIR / esm_id

    def model_dir(self, esm_id: str) -> Path | None:
        """Folder of the kept fine-tuned source model, or None if the build did not keep it."""
        entry = self.get(esm_id)
        return self.path / MODEL_DIR / esm_id if entry.has_model else None

    def config(self, esm_id: str) -> ESMConfig:
        data = json.loads((self.esm_dir(esm_id) / CONFIG_NAME).read_text())
        return ESMConfig.from_dict(data)

    def load_esm(self, esm_id: str, *, encoder: EncoderIdentity | None = None
                 ) -> EmbeddingSpaceMap:
        """Load one ESM; with ``encoder``, refuse it if it was made for another encoder."""
        self.get(esm_id)
        return EmbeddingSpaceMap.load(self.esm_dir(esm_id), encoder=encoder)

    def profile(self, esm_id: str) -> dict[str, Any]:
        """The source profile (``token_counts``, ``num_train``) stored with an ESM."""
        path = self.esm_dir(esm_id) / PROFILE_NAME
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    def encoders(self) -> list[EncoderIdentity]:
        """Distinct encoder configurations in the registry."""
        rows = self._conn.execute(
            "SELECT DISTINCT base_model, fingerprint, pooling, max_length, layer, in_dim FROM esms")
        return [EncoderIdentity(*r) for r in rows]

    def check_encoder(self, encoder: EncoderIdentity) -> None:
        """Refuse, naming both, when no ESM here was made for ``encoder``."""
        found = self.encoders()
        if found and not any(same_encoder(e, encoder) for e in found):
            names = sorted({f"{e.name} ({e.fingerprint}, {e.pooling}, max_length "
                            f"{e.max_length}, layer {e.layer})" for e in found})
            raise EncoderMismatchError(
                f"Registry {str(self.path)!r} was built for {', '.join(names)}; the encoder "
                f"asked for is {encoder.name} ({encoder.fingerprint}, {encoder.pooling}, "
                f"max_length {encoder.max_length}, layer {encoder.layer})."
            )

    # -- writing ----------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.readonly:
            raise RegistryError(f"Registry {str(self.path)!r} is open read-only.")

    def add(
        self,
        esm: EmbeddingSpaceMap,
        *,
        esm_id: str,
        settings_key: str,
        task_vector: np.ndarray | None = None,
        profile: dict[str, Any] | None = None,
        model_dir: Path | None = None,
    ) -> RegistryEntry:
        """Add an ESM atomically (see the module docstring).

        ``model_dir``: a folder holding the fine-tuned source model to keep; it is
        moved into the registry.
        """
        self._require_writable()
        if esm_id in self:
            raise RegistryError(f"ESM {esm_id!r} is already in the registry; remove it first.")
        staging = self.path / STAGING_DIR / f"{esm_id}-{uuid.uuid4().hex[:8]}"
        esm.save(staging / ESM_DIR)
        if profile is not None:
            (staging / ESM_DIR / PROFILE_NAME).write_text(json.dumps(profile, sort_keys=True))
        if model_dir is not None:
            shutil.move(str(model_dir), staging / MODEL_DIR)
        _fsync_tree(staging)
        checksum, size = folder_checksum(staging / ESM_DIR)
        cfg = esm.config
        enc = cfg.encoder_identity
        vec = None if task_vector is None else np.asarray(task_vector, np.float32).tobytes()
        row = (esm_id, cfg.task_id, enc.name, enc.fingerprint, enc.pooling, enc.max_length,
               enc.layer, cfg.in_dim, cfg.out_dim, cfg.architecture, cfg.num_examples,
               cfg.label_kind, len(cfg.classes), settings_key, checksum, size,
               int(model_dir is not None), cfg.created, vec)
        marks = ", ".join("?" * len(_COLUMNS))
        with self._conn:
            self._conn.execute(f"INSERT INTO pending VALUES ({marks})", row)
        final = self.esm_dir(esm_id)
        for sub, dest in ((ESM_DIR, final), (MODEL_DIR, self.path / MODEL_DIR / esm_id)):
            if (staging / sub).exists():
                if dest.exists():  # an orphan from an interrupted removal
                    shutil.rmtree(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging / sub, dest)
        shutil.rmtree(staging, ignore_errors=True)
        with self._conn:
            self._conn.execute("INSERT INTO esms SELECT * FROM pending WHERE id = ?", (esm_id,))
            self._conn.execute("DELETE FROM pending WHERE id = ?", (esm_id,))
            self._bump_generation()
        return self.get(esm_id)

    def remove(self, esm_id: str) -> None:
        """Remove an ESM (row first, then its files)."""
        self._require_writable()
        self.get(esm_id)
        with self._conn:
            self._conn.execute("DELETE FROM esms WHERE id = ?", (esm_id,))
            self._bump_generation()
        for folder in (self.esm_dir(esm_id), self.path / MODEL_DIR / esm_id):
            shutil.rmtree(folder, ignore_errors=True)

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                           "WHERE key = 'generation'")

    @property
    def generation(self) -> int:
        """Counter bumped by every add and remove; derived files (the task index) record it."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return 0 if row is None else int(row[0])

    def _recover(self) -> None:
        """Finish interrupted adds whose files are complete; drop leftovers of the rest."""
        pending = [_row_to_entry(r) for r in self._conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM pending")]
        for entry in pending:
            folder = self.esm_dir(entry.id)
            if folder.exists() and folder_checksum(folder)[0] == entry.checksum:
                logger.warning("Registry: completing the interrupted addition of %r.", entry.id)
                with self._conn:
                    self._conn.execute("INSERT OR REPLACE INTO esms SELECT * FROM pending "
                                       "WHERE id = ?", (entry.id,))
                    self._conn.execute("DELETE FROM pending WHERE id = ?", (entry.id,))
                    self._bump_generation()
            else:
                logger.warning("Registry: discarding the interrupted addition of %r.", entry.id)
                with self._conn:
                    self._conn.execute("DELETE FROM pending WHERE id = ?", (entry.id,))
        shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)
        known = {r[0] for r in self._conn.execute("SELECT id FROM esms")}
        for sub in (ESM_DIR, MODEL_DIR):
            root = self.path / sub
            if root.exists():
                for folder in root.iterdir():
                    if folder.name not in known:
                        logger.warning("Registry: removing orphan folder %s.", folder)
                        shutil.rmtree(folder, ignore_errors=True)

    # -- checking ---------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every checksum, that every row has its files and every folder its row."""
        problems: list[str] = []
        entries = self.entries()
        known = {e.id for e in entries}
        for e in entries:
            folder = self.esm_dir(e.id)
            if not folder.is_dir():
                problems.append(f"{e.id}: row without folder {folder}")
                continue
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                if not (folder / name).is_file():
                    problems.append(f"{e.id}: missing {name}")
            checksum, _ = folder_checksum(folder)
            if checksum != e.checksum:
                problems.append(f"{e.id}: checksum mismatch (row {e.checksum[:12]}, files "
                                f"{checksum[:12]})")
                continue
            try:
                ESMConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
            except (ESMFormatError, ValueError, TypeError) as err:
                problems.append(f"{e.id}: unreadable config ({err})")
            if e.has_model and not (self.path / MODEL_DIR / e.id).is_dir():
                problems.append(f"{e.id}: row says a source model is kept but "
                                f"{MODEL_DIR}/{e.id} is missing")
        for sub in (ESM_DIR, MODEL_DIR):
            root = self.path / sub
            if root.exists():
                problems += [f"{sub}/{f.name}: folder without row" for f in root.iterdir()
                             if f.name not in known]
        n_pending = self._conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        if n_pending:
            problems.append(f"{n_pending} interrupted addition(s) pending; open the registry "
                            "for writing to finish or discard them")
        return VerifyReport(len(entries), problems)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def same_encoder(a: EncoderIdentity, b: EncoderIdentity) -> bool:
    """Whether embeddings from ``a`` and ``b`` are interchangeable (by fingerprint, or by
    name and dimension for imported ESMs that carry no fingerprint)."""
    if a.fingerprint and b.fingerprint:
        return (a.fingerprint, a.pooling, a.max_length, a.layer) == (
            b.fingerprint, b.pooling, b.max_length, b.layer)
    return a.name == b.name and a.dim == b.dim


def new_created() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


DEFAULT_REGISTRY_ENV = "STEPSTONE_REGISTRY"


def default_registry_path() -> Path:
    """``$STEPSTONE_REGISTRY``, else the registry shipped inside this package."""
    env = os.environ.get(DEFAULT_REGISTRY_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "default_registry"


def open_registry(path: str | Path | None = None) -> Registry:
    """Open ``path``, or the default registry read-only when ``path`` is None."""
    if path is None:
        return Registry(default_registry_path(), readonly=True)
    return Registry(path)
