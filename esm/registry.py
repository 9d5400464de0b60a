"""The ESM registry: a folder with ``registry.sqlite`` and one folder per ESM.

Layout::

    registry.sqlite          one row per ESM (id, task, encoder, dims, sizes, checksum, ...)
    esms/<id>/config.json    the ESM (see stepstone.esm.model)
    esms/<id>/model.safetensors
    esms/<id>/profile.json   source profile: token counts for vocabulary overlap
    models/<id>/             optional: the fine-tuned source encoder + head
    .staging/<id>-<token>/   an addition being written; never read
    registry.lock            held (``flock``) by the one process writing

Readers (``Registry(path)``, mode ``"r"``) open the SQLite file read-only and never
create, change or delete anything. Writers (``Registry(path, "w")``) take the lock
for every write, so two builds serialise and a reader racing a build sees either
the old or the new state.

Writes are atomic: an addition is first recorded as *pending* (with its staging
folder's name), written to ``.staging/<id>-<token>``, fsynced, renamed into
``esms/`` and then moved from pending to the main table in one transaction. A
removal deletes the row and records a pending removal in one transaction, then
deletes the files. Opening for writing finishes or undoes only these recorded
operations, so an interrupted build loses nothing already added and a rerun
resumes. Anything else the registry does not know (a stray folder, a folder
without row, a missing manifest) is never deleted: :meth:`Registry.verify` reports
it and :func:`repair_registry` adds the ESM folders that lack a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stepstone.esm import registry_lock
from stepstone.esm.atomic import fsync_dir, fsync_tree
from stepstone.esm.encoder import EncoderIdentity, EncoderMismatchError
from stepstone.esm.errors import RegistryError
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
# The settings key of a row made by repair_registry from an ESM folder (the build's
# key lives only in the manifest); see Registry.find.
REBUILT_KEY_PREFIX = "rebuilt:"

_COLUMNS = (
    "id", "task_id", "base_model", "fingerprint", "pooling", "max_length", "layer", "in_dim",
    "out_dim", "architecture", "num_examples", "label_kind", "num_classes", "settings_key",
    "checksum", "size_bytes", "has_model", "created", "task_vector",
)
_COLS = ", ".join(_COLUMNS)
# A pending operation also records its staging folder's name and its kind.
_PENDING_EXTRA = ("staging", "op")
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
-- covers Registry.encoders() and Registry.ids(): a ranking never scans the row blobs
CREATE INDEX IF NOT EXISTS esms_encoder ON esms (base_model, fingerprint, pooling,
    max_length, layer, in_dim, task_id, id);
CREATE INDEX IF NOT EXISTS esms_task ON esms (task_id, id);
CREATE TABLE IF NOT EXISTS pending ({", ".join(_COLUMNS + _PENDING_EXTRA)});
"""

# ESM ids name folders: letters, digits, '.', '_', '-', starting with a letter or digit,
# never '..'. Checked on every read from the manifest and every path made from an id.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_TOKEN_RE = re.compile(r"[0-9a-f]{8}")
_REPAIR_HINT = "`stepstone registry repair --registry {path}`"


def is_valid_id(esm_id: object) -> bool:
    """Whether ``esm_id`` is a safe ESM id (see :func:`check_esm_id`)."""
    return isinstance(esm_id, str) and _ID_RE.fullmatch(esm_id) is not None \
        and ".." not in esm_id


def check_esm_id(esm_id: object) -> str:
    """Return ``esm_id`` if it is a safe folder name, else raise :class:`RegistryError`."""
    if not is_valid_id(esm_id):
        raise RegistryError(
            f"{esm_id!r} is not a valid ESM id: expected 1-201 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit, without '..'.")
    return esm_id  # type: ignore[return-value]


def esm_id_for(task_id: str, key: str) -> str:
    """The id of a new ESM: the task id made folder-safe, then 8 characters of ``key``.

    Ids that are already safe (every built-in task) are kept as they were.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task_id)
    safe = re.sub(r"\.{2,}", ".", safe).lstrip("._-")[:180] or "esm"
    return f"{safe}-{key[:8]}"


def check_finite(esm: EmbeddingSpaceMap, *, what: str) -> None:
    """Refuse an ESM whose weights hold NaN or inf (it would poison every score)."""
    import torch

    bad = sorted(name for name, t in esm.state_dict().items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ESMFormatError(f"{what} has non-finite (NaN or inf) weights in {bad}.")


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
    """Result of :meth:`Registry.verify`: ``ok`` iff ``problems`` is empty.

    ``notes``: things that are fine but worth saying (an addition in progress).
    """

    checked: int
    problems: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        notes = "".join(f"\n  note: {n}" for n in self.notes)
        if self.ok:
            return (f"OK: {self.checked} ESMs, every checksum matches, rows and files "
                    f"agree.{notes}")
        return f"{len(self.problems)} problem(s) in {self.checked} ESMs:\n" + "\n".join(
            f"  - {p}" for p in self.problems) + notes


@dataclass
class RepairReport:
    """What :func:`repair_registry` did, and what it left for a person to decide."""

    created_manifest: bool = False
    recovered: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    removed_rows: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = []
        if self.created_manifest:
            lines.append(f"created a new {DB_NAME}")
        lines += [f"recovered: {r}" for r in self.recovered]
        if self.added:
            lines.append(f"added {len(self.added)} row(s) from ESM folders "
                         f"(checksums recomputed): {', '.join(self.added)}")
            lines.append("  their task vectors are not stored in the folders: textemb lists "
                         "them as errors and --prefilter never selects them until rebuilt")
        lines += [f"removed row with unsafe id {r!r} (no file touched)"
                  for r in self.removed_rows]
        lines += [f"refused {name}: {why}" for name, why in self.refused.items()]
        lines += ([f"left as is: {p}" for p in self.remaining]
                  or ["the registry verifies: OK"])
        return "\n".join(lines)


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


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _normalise_modes(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask, whatever wrote them (safetensors
    writes 0600, temporary folders are 0700)."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _row_to_entry(row: sqlite3.Row | tuple) -> RegistryEntry:
    values = dict(zip(_COLUMNS, row, strict=True))
    blob = values.pop("task_vector")
    vec = None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()
    values["has_model"] = bool(values["has_model"])
    return RegistryEntry(**values, task_vector=vec)


def _is_inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _present_entries(path: Path) -> list[str]:
    """What lies in ``esms/`` and ``models/`` (relative names)."""
    out = []
    for sub in (ESM_DIR, MODEL_DIR):
        root = path / sub
        if root.is_dir():
            out += [f"{sub}/{p.name}" for p in sorted(root.iterdir())]
    return out


def _manifest_missing_error(path: Path, what: str) -> RegistryError:
    found = _present_entries(path)
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return RegistryError(
        f"{what}, but {path} holds {len(found)} ESM/model folder(s) ({shown}). Nothing was "
        f"changed. Rebuild the manifest from the ESM folders (each carries its config; the "
        f"checksums are recomputed) with {_REPAIR_HINT.format(path=path)}.")


class Registry:
    """An ESM registry on disk.

    Parameters
    ----------
    path : str or Path
        The registry folder.
    mode : {"r", "w"}
        ``"r"`` (default): read-only; the SQLite file is opened with ``mode=ro`` and
        nothing on disk is created, changed or deleted. ``"w"``: for adding and
        removing ESMs; opening takes the write lock and finishes or undoes the
        operations an interrupted writer recorded as pending (nothing else).
    create : bool
        With ``mode="w"``: create an empty registry when the folder holds none.
    lock_timeout : float, optional
        Seconds a writer waits for another writer's lock (default: as long as it takes).
    """

    def __init__(self, path: str | Path, mode: Literal["r", "w"] = "r", *,
                 create: bool = False, lock_timeout: float | None = None) -> None:
        if mode not in ("r", "w"):
            raise RegistryError(f"'mode' must be 'r' or 'w'; got {mode!r}.")
        if create and mode != "w":
            raise RegistryError("create=True needs mode='w' (a reader never creates).")
        self.path = Path(path)
        self.mode = mode
        self.lock_timeout = lock_timeout
        self._conn: sqlite3.Connection | None = None
        if mode == "r":
            self._conn = self._connect_readonly()
        else:
            if create:
                self.path.mkdir(parents=True, exist_ok=True)
            elif not self.path.is_dir():
                raise RegistryError(
                    f"No registry at {str(self.path)!r} (expected {DB_NAME} there). Build one "
                    "with `stepstone registry build --registry DIR ...`.")
            with self.write_lock():
                self._conn = self._connect_writable(create)
                self._recover()

    @property
    def readonly(self) -> bool:
        return self.mode == "r"

    # -- opening ----------------------------------------------------------------------
    def _manifest_state(self) -> str:
        """'missing', 'empty' (0 bytes) or 'present'."""
        db = self.path / DB_NAME
        if not db.exists():
            return "missing"
        return "empty" if db.is_file() and db.stat().st_size == 0 else "present"

    def _check_tables(self, conn: sqlite3.Connection) -> set[str]:
        db = self.path / DB_NAME
        try:
            return {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as err:
            conn.close()
            raise RegistryError(
                f"{db} is not a readable stepstone registry database ({err}). Nothing was "
                f"changed. To rebuild it from the ESM folders, move it aside and run "
                f"{_REPAIR_HINT.format(path=self.path)}.") from None

    def _require_manifest(self, *, create: bool = False) -> Path:
        """The manifest's path; refuses a missing or empty one (a writer may ``create``
        it where no ESM folders are present: folders without a manifest need repair)."""
        db = self.path / DB_NAME
        state = self._manifest_state()
        if state != "present":
            if _present_entries(self.path):
                raise _manifest_missing_error(
                    self.path, f"{db} is {'empty (0 bytes)' if state == 'empty' else 'missing'}")
            if not create:
                raise RegistryError(
                    f"No registry at {str(self.path)!r} (expected a non-empty {DB_NAME} "
                    "there). Build one with `stepstone registry build --registry DIR ...`.")
        return db

    def _connect_readonly(self) -> sqlite3.Connection:
        db = self._require_manifest()
        try:
            conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=60)
        except sqlite3.DatabaseError as err:
            raise RegistryError(f"Cannot open {db} read-only ({err}).") from None
        tables = self._check_tables(conn)
        if not {"esms", "meta", "pending"} <= tables:
            conn.close()
            if not tables and _present_entries(self.path):
                raise _manifest_missing_error(self.path, f"{db} holds no tables")
            raise RegistryError(f"{db} lacks the 'esms'/'meta'/'pending' tables; it is not a "
                                "stepstone registry.")
        return conn

    def _connect_writable(self, create: bool) -> sqlite3.Connection:
        db = self._require_manifest(create=create)
        conn = sqlite3.connect(db, timeout=60)
        tables = self._check_tables(conn)
        if tables and not {"esms", "meta", "pending"} <= tables:
            conn.close()
            raise RegistryError(f"{db} lacks the 'esms'/'meta'/'pending' tables; it is not a "
                                "stepstone registry.")
        if not tables and _present_entries(self.path):
            conn.close()
            raise _manifest_missing_error(self.path, f"{db} holds no tables")
        conn.executescript(_SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(pending)")}
        for col in _PENDING_EXTRA:  # registries written before pending recorded these
            if col not in have:
                conn.execute(f"ALTER TABLE pending ADD COLUMN {col}")
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format_version', ?)",
                     (str(REGISTRY_FORMAT),))
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')")
        conn.commit()
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"Registry {str(self.path)!r} is closed.")
        return self._conn

    # -- paths ------------------------------------------------------------------------
    def _inside(self, sub: str, esm_id: str) -> Path:
        """``path/sub/<id>`` after checking the id and that it resolves inside ``path/sub``."""
        check_esm_id(esm_id)
        folder = self.path / sub / esm_id
        if (folder.exists() or folder.is_symlink()) and not _is_inside(self.path / sub, folder):
            raise RegistryError(f"{folder} resolves to {folder.resolve()}, outside the "
                                f"registry's {sub}/ folder; it is not read or changed.")
        return folder

    def esm_dir(self, esm_id: str) -> Path:
        return self._inside(ESM_DIR, esm_id)

    def _model_path(self, esm_id: str) -> Path:
        return self._inside(MODEL_DIR, esm_id)

    # -- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(is_valid_id(r[0]) for r in self.conn.execute("SELECT id FROM esms"))

    def __contains__(self, esm_id: str) -> bool:
        if not is_valid_id(esm_id):
            return False
        row = self.conn.execute("SELECT 1 FROM esms WHERE id = ?", (esm_id,)).fetchone()
        return row is not None

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(self.entries())

    def _rows(self, where: str = "", params: tuple = ()) -> list[RegistryEntry]:
        rows = self.conn.execute(f"SELECT {_COLS} FROM esms {where}", params).fetchall()
        out = []
        for r in rows:
            if is_valid_id(r[0]):
                out.append(_row_to_entry(r))
            else:
                logger.warning("Registry %s: ignoring a row with the unsafe id %r (see "
                               "`stepstone registry verify`).", self.path, r[0])
        return out

    def entries(self) -> list[RegistryEntry]:
        """All rows with a valid id, ordered by task id then id."""
        return self._rows("ORDER BY task_id, id")

    def ids(self, *, encoders: list[EncoderIdentity] | None = None,
            task_ids: list[str] | None = None) -> list[str]:
        """Valid ids, ordered as :meth:`entries`, of the rows made with one of ``encoders``
        (exact column values, as :meth:`encoders` returns them) and of one of
        ``task_ids`` (None: any). Selected in SQL, so a ranking of a large registry
        never builds an entry per row."""
        where, params = [], []
        if encoders is not None:
            groups = ["(base_model IS ? AND fingerprint IS ? AND pooling IS ? AND max_length "
                      "IS ? AND layer IS ? AND in_dim IS ?)"] * len(encoders)
            where.append("(" + (" OR ".join(groups) or "0") + ")")
            params += [v for k in encoders for v in (k.name, k.fingerprint, k.pooling,
                                                     k.max_length, k.layer, k.dim)]
        if task_ids is not None:
            where.append(f"task_id IN ({', '.join('?' * len(task_ids))})")
            params += list(task_ids)
        sql = ("SELECT id FROM esms " + ("WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY task_id, id")
        return [r[0] for r in self.conn.execute(sql, params) if is_valid_id(r[0])]

    def entries_for(self, esm_ids: list[str]) -> list[RegistryEntry]:
        """The rows of ``esm_ids``, in that order (ids without a row are left out)."""
        found: dict[str, RegistryEntry] = {}
        for start in range(0, len(esm_ids), 500):  # SQLite caps bound parameters
            chunk = esm_ids[start:start + 500]
            found.update((e.id, e) for e in self._rows(
                f"WHERE id IN ({', '.join('?' * len(chunk))})", tuple(chunk)))
        return [found[i] for i in esm_ids if i in found]

    def get(self, esm_id: str) -> RegistryEntry:
        check_esm_id(esm_id)
        found = self._rows("WHERE id = ?", (esm_id,))
        if not found:
            raise RegistryError(f"No ESM {esm_id!r} in registry {str(self.path)!r}; it has "
                                f"{len(self)} ESMs (see `stepstone registry list`).")
        return found[0]

    def resolve(self, name: str) -> RegistryEntry:
        """The ESM with id ``name``, or the one ESM of task ``name`` (``builtin:`` ok).

        Raises
        ------
        RegistryError
            When the task has several ESMs (their ids are named), or nothing matches
            (the closest ids and task ids are suggested).
        """
        if name in self:
            return self.get(name)
        entries = self.entries()
        task = name.removeprefix("builtin:")
        found = [e for e in entries if e.task_id == task]
        if len(found) == 1:
            return found[0]
        if found:
            raise RegistryError(f"Task {task!r} has {len(found)} ESMs in registry "
                                f"{str(self.path)!r}: {', '.join(e.id for e in found)}; "
                                "name one by its id.")
        import difflib

        names = sorted({e.id for e in entries} | {e.task_id for e in entries})
        close = difflib.get_close_matches(task, names, n=5, cutoff=0.5)
        hint = (f"did you mean {', '.join(close)}?" if close else
                "see `stepstone registry list`.")
        raise RegistryError(f"No ESM or task {name!r} in registry {str(self.path)!r} "
                            f"({len(entries)} ESMs); {hint}")

    def find(self, settings_key: str) -> RegistryEntry | None:
        """The entry built with exactly these settings, if any.

        A row rebuilt from its folder by :func:`repair_registry` lost its settings key;
        it matches when its id ends in the key's first 8 characters, which is how
        builds and imports name their ESMs.
        """
        found = self._rows("WHERE settings_key = ?", (settings_key,))
        if not found:
            found = [e for e in self._rows("WHERE settings_key LIKE ?",
                                           (REBUILT_KEY_PREFIX + "%",))
                     if e.id.endswith("-" + settings_key[:8])]
        return found[0] if found else None

    def model_dir(self, esm_id: str) -> Path | None:
        """Folder of the kept fine-tuned source model, or None if the build did not keep it."""
        entry = self.get(esm_id)
        return self._model_path(esm_id) if entry.has_model else None

    def check_files(self, esm_id: str) -> RegistryEntry:
        """The entry, after checking its folder's checksum against the row's.

        Raises
        ------
        RegistryError
            When the folder is missing or its files changed after the ESM was added.
        """
        entry = self.get(esm_id)
        folder = self.esm_dir(esm_id)
        if not folder.is_dir():
            raise RegistryError(f"ESM {esm_id!r}: its folder {folder} is missing (see "
                                "`stepstone registry verify`).")
        checksum, _ = folder_checksum(folder)
        if checksum != entry.checksum:
            raise RegistryError(
                f"ESM {esm_id!r}: checksum mismatch (row {entry.checksum[:12]}, files "
                f"{checksum[:12]}): its files changed after it was added; see `stepstone "
                "registry verify`.")
        return entry

    def config(self, esm_id: str, *, verify: bool = False) -> ESMConfig:
        """An ESM's config; with ``verify``, only after :meth:`check_files` passed."""
        if verify:
            self.check_files(esm_id)
        else:
            self.get(esm_id)
        path = self.esm_dir(esm_id) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ESMFormatError(f"{path} is not readable JSON ({err}).") from None
        return ESMConfig.from_dict(data)

    def load_esm(self, esm_id: str, *, encoder: EncoderIdentity | None = None,
                 verify: bool = True) -> EmbeddingSpaceMap:
        """Load one ESM; with ``encoder``, refuse it if it was made for another encoder.

        ``verify`` (default): check the folder's checksum first (cheap next to scoring)
        and refuse non-finite weights, so a corrupt ESM is an error naming its id.
        """
        if verify:
            self.check_files(esm_id)
        else:
            self.get(esm_id)
        esm = EmbeddingSpaceMap.load(self.esm_dir(esm_id), encoder=encoder)
        check_finite(esm, what=f"ESM {esm_id!r}")
        return esm

    def profile(self, esm_id: str) -> dict[str, Any]:
        """The source profile (``token_counts``, ``num_train``) stored with an ESM."""
        path = self.esm_dir(esm_id) / PROFILE_NAME
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    def encoders(self) -> list[EncoderIdentity]:
        """Distinct encoder configurations in the registry."""
        rows = self.conn.execute(
            "SELECT DISTINCT base_model, fingerprint, pooling, max_length, layer, in_dim FROM esms")
        return [EncoderIdentity(*r) for r in rows]

    def check_encoder(self, encoder: EncoderIdentity) -> None:
        """Refuse, naming both, when no ESM here was made for ``encoder``."""
        found = self.encoders()
        if found and not any(e.matches(encoder) for e in found):
            names = sorted({f"{e.name} ({e.fingerprint}, {e.pooling}, max_length "
                            f"{e.max_length}, layer {e.layer})" for e in found})
            raise EncoderMismatchError(
                f"Registry {str(self.path)!r} was built for {', '.join(names)}; the encoder "
                f"asked for is {encoder.name} ({encoder.fingerprint}, {encoder.pooling}, "
                f"max_length {encoder.max_length}, layer {encoder.layer})."
            )

    @property
    def generation(self) -> int:
        """Counter bumped by every add and remove; derived files (the task index) record it."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return 0 if row is None else int(row[0])

    # -- writing ----------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.readonly:
            raise RegistryError(f"Registry {str(self.path)!r} is open read-only; open it with "
                                "Registry(path, 'w') to change it.")

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the registry's write lock (re-entrant in one thread). A build holds it
        for its whole run, so a second build waits, then skips what the first added."""
        self._require_writable()
        with registry_lock.write_lock(self.path, timeout=self.lock_timeout):
            yield

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

        Raises
        ------
        RegistryError
            For an invalid id, an id already present, or a folder of that name that
            the registry does not know (it is left alone).
        ESMFormatError
            When the weights hold NaN or inf.
        """
        self._require_writable()
        check_esm_id(esm_id)
        check_finite(esm, what=f"ESM {esm_id!r}")
        with self.write_lock():
            if esm_id in self:
                raise RegistryError(f"ESM {esm_id!r} is already in the registry; remove it "
                                    "first.")
            final, model_final = self.esm_dir(esm_id), self._model_path(esm_id)
            for dest in (final, model_final):
                if dest.exists() or dest.is_symlink():
                    raise RegistryError(
                        f"Cannot add ESM {esm_id!r}: {dest} exists but has no row; it was left "
                        "alone. Inspect it (`stepstone registry verify`), then move it away or "
                        f"add it with {_REPAIR_HINT.format(path=self.path)}.")
            name = f"{esm_id}-{uuid.uuid4().hex[:8]}"
            staging = self.path / STAGING_DIR / name
            cfg = esm.config
            enc = cfg.encoder_identity
            vec = None if task_vector is None else np.asarray(task_vector, np.float32).tobytes()
            row = (esm_id, cfg.task_id, enc.name, enc.fingerprint, enc.pooling, enc.max_length,
                   enc.layer, cfg.in_dim, cfg.out_dim, cfg.architecture, cfg.num_examples,
                   cfg.label_kind, len(cfg.classes), settings_key, "", 0,
                   int(model_dir is not None), cfg.created, vec, name, "add")
            # Recorded before the first file is written: recovery only ever touches
            # staging folders a pending row names.
            with self.conn:
                self.conn.execute(
                    f"INSERT INTO pending ({_COLS}, {', '.join(_PENDING_EXTRA)}) VALUES "
                    f"({', '.join('?' * len(row))})", row)
            try:
                self._write_staged(esm, esm_id, staging, final, model_final, profile=profile,
                                   model_dir=model_dir)
            except BaseException:
                self._recover_one(esm_id)
                raise
        return self.get(esm_id)

    def _write_staged(self, esm: EmbeddingSpaceMap, esm_id: str, staging: Path, final: Path,
                      model_final: Path, *, profile: dict[str, Any] | None,
                      model_dir: Path | None) -> None:
        esm.save(staging / ESM_DIR)
        if profile is not None:
            (staging / ESM_DIR / PROFILE_NAME).write_text(json.dumps(profile, sort_keys=True))
        if model_dir is not None:
            shutil.move(str(model_dir), staging / MODEL_DIR)
        _normalise_modes(staging)
        fsync_tree(staging)
        checksum, size = folder_checksum(staging / ESM_DIR)
        with self.conn:
            self.conn.execute("UPDATE pending SET checksum = ?, size_bytes = ? WHERE id = ?",
                              (checksum, size, esm_id))
        # The model moves first: the ESM folder's arrival is what recovery finishes on.
        for sub, dest in ((MODEL_DIR, model_final), (ESM_DIR, final)):
            if (staging / sub).exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging / sub, dest)
                fsync_dir(dest.parent)
        shutil.rmtree(staging)
        self._rmdir_staging()
        with self.conn:
            self.conn.execute(f"INSERT INTO esms ({_COLS}) SELECT {_COLS} FROM pending "
                              "WHERE id = ?", (esm_id,))
            self.conn.execute("DELETE FROM pending WHERE id = ?", (esm_id,))
            self._bump_generation()

    def remove(self, esm_id: str) -> None:
        """Remove an ESM: its row goes (recorded as a pending removal in the same
        transaction), then its files."""
        self._require_writable()
        check_esm_id(esm_id)
        with self.write_lock():
            self.get(esm_id)
            self.esm_dir(esm_id)  # both refuse a path that leaves the registry
            self._model_path(esm_id)
            with self.conn:
                self.conn.execute(
                    f"INSERT INTO pending ({_COLS}, {', '.join(_PENDING_EXTRA)}) SELECT {_COLS}, "
                    "NULL, 'remove' FROM esms WHERE id = ?", (esm_id,))
                self.conn.execute("DELETE FROM esms WHERE id = ?", (esm_id,))
                self._bump_generation()
            self._recover_one(esm_id)

    def _bump_generation(self) -> None:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                          "WHERE key = 'generation'")

    def _rmdir_staging(self) -> None:
        try:
            (self.path / STAGING_DIR).rmdir()
        except OSError:  # not empty (another recorded addition) or absent
            pass

    def _delete_folder(self, folder: Path) -> None:
        if folder.is_symlink():
            folder.unlink()
        elif folder.exists():
            shutil.rmtree(folder)

    def _recover(self) -> list[str]:
        """Finish or undo every pending operation (under the write lock); returns what
        was done, one line each."""
        ids = [r[0] for r in self.conn.execute("SELECT id FROM pending")]
        done = [self._recover_one(i) for i in ids]
        self._rmdir_staging()
        return [d for d in done if d]

    def _recover_one(self, esm_id: str) -> str:
        """Finish or undo the pending operation on ``esm_id``: only the staging folder it
        names, and the id's own folders when the operation put them there."""
        row = self.conn.execute(
            f"SELECT {_COLS}, {', '.join(_PENDING_EXTRA)} FROM pending WHERE id = ?",
            (esm_id,)).fetchone()
        if row is None:
            return ""
        if not is_valid_id(esm_id):
            logger.error("Registry %s: a pending row has the unsafe id %r; left alone (see "
                         "`stepstone registry verify`).", self.path, esm_id)
            return ""
        entry = _row_to_entry(row[:len(_COLUMNS)])
        staging_name, op = row[len(_COLUMNS):]
        staging = None
        if isinstance(staging_name, str) and staging_name.startswith(esm_id + "-") and \
                _TOKEN_RE.fullmatch(staging_name[len(esm_id) + 1:]):
            staging = self.path / STAGING_DIR / staging_name
        try:
            final, model_final = self.esm_dir(esm_id), self._model_path(esm_id)
        except RegistryError as err:
            logger.error("Registry %s: pending operation on %r left alone: %s", self.path,
                         esm_id, err)
            return ""
        if op == "remove":
            for folder in (final, model_final):
                self._delete_folder(folder)
            message = f"finished the interrupted removal of {esm_id!r}"
        elif (entry.checksum and final.is_dir() and esm_id not in self
              and folder_checksum(final)[0] == entry.checksum):
            with self.conn:
                self.conn.execute(f"INSERT INTO esms ({_COLS}) SELECT {_COLS} FROM pending "
                                  "WHERE id = ?", (esm_id,))
                self.conn.execute("DELETE FROM pending WHERE id = ?", (esm_id,))
                self._bump_generation()
            message = f"completed the interrupted addition of {esm_id!r}"
        else:
            # add() refuses when either folder exists, so a model folder under this id
            # without a row was moved there by this very addition.
            if op == "add" and entry.has_model and esm_id not in self:
                self._delete_folder(model_final)
            if final.exists() and esm_id not in self:
                logger.warning("Registry %s: %s does not match the interrupted addition it "
                               "belongs to; left alone (see `stepstone registry verify`).",
                               self.path, final)
            message = f"discarded the interrupted addition of {esm_id!r}"
        if staging is not None and staging.exists():
            shutil.rmtree(staging)
        with self.conn:
            self.conn.execute("DELETE FROM pending WHERE id = ?", (esm_id,))
        self._rmdir_staging()
        logger.warning("Registry %s: %s.", self.path, message)
        return message

    # -- checking ---------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every row's id, files, checksum, config and weights, that every folder
        has its row, and that nothing is left pending. Changes nothing."""
        problems: list[str] = []
        notes: list[str] = []
        ids = [r[0] for r in self.conn.execute("SELECT id FROM esms ORDER BY id")]
        bad_ids = [i for i in ids if not is_valid_id(i)]
        problems += [f"row with unsafe id {i!r}: not a valid ESM id, its files are not read "
                     f"(drop the row with {_REPAIR_HINT.format(path=self.path)})"
                     for i in bad_ids]
        entries = self.entries()
        known = {e.id for e in entries}
        for e in entries:
            try:
                folder, model = self.esm_dir(e.id), self._model_path(e.id)
            except RegistryError as err:
                problems.append(f"{e.id}: {err}")
                continue
            if not folder.is_dir():
                problems.append(f"{e.id}: row without folder {folder}")
                continue
            missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
            problems += [f"{e.id}: missing {name}" for name in missing]
            checksum, _ = folder_checksum(folder)
            if checksum != e.checksum:
                problems.append(f"{e.id}: checksum mismatch (row {e.checksum[:12]}, files "
                                f"{checksum[:12]})")
                continue
            if not missing:
                try:
                    check_finite(EmbeddingSpaceMap.load(folder), what="its ESM")
                except (ESMFormatError, ValueError, TypeError, KeyError, RuntimeError) as err:
                    problems.append(f"{e.id}: unreadable ESM ({err})")
            if e.has_model and not model.is_dir():
                problems.append(f"{e.id}: row says a source model is kept but "
                                f"{MODEL_DIR}/{e.id} is missing")
        for rel in _present_entries(self.path):
            name = rel.split("/", 1)[1]
            if name not in known:
                kind = "folder" if (self.path / rel).is_dir() else "file"
                problems.append(f"{rel}: {kind} without row (left alone; "
                                f"{_REPAIR_HINT.format(path=self.path)} adds ESM folders)")
        # Registries written before pending rows named their staging folder lack the column.
        cols = {r[1] for r in self.conn.execute("PRAGMA table_info(pending)")}
        pending = {r[0]: r[1] for r in self.conn.execute(
            f"SELECT id, {'staging' if 'staging' in cols else 'NULL'} FROM pending")}
        # A writer verifying under its own lock has nothing in flight but what it reports.
        ours = not self.readonly and registry_lock.holds_write_lock(self.path)
        if pending and not ours and registry_lock.writer_active(self.path):
            notes.append(f"a writer is adding or removing {sorted(pending)} right now")
        else:
            problems += [f"{i}: interrupted operation pending; open the registry for writing "
                         f"(e.g. {_REPAIR_HINT.format(path=self.path)}) to finish or discard it"
                         for i in sorted(pending)]
        staging = self.path / STAGING_DIR
        if staging.is_dir():
            problems += [f"{STAGING_DIR}/{p.name}: not a pending addition (left alone)"
                         for p in sorted(staging.iterdir()) if p.name not in pending.values()]
        return VerifyReport(len(entries), problems, notes)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_registry(path: str | Path, *, lock_timeout: float | None = None) -> RepairReport:
    """Make a registry consistent again without deleting anything it does not own.

    Under the write lock: finish or undo interrupted operations; when
    ``registry.sqlite`` is missing or empty, create it; add a row for every ESM folder
    in ``esms/`` that has none (its config must load and its weights be finite; the
    checksum is recomputed; a ``models/<id>`` folder next to it is recorded as its
    kept model); drop rows whose id is unsafe (their files are never touched). Rows
    without files, stray files and folders that are not ESMs are reported in
    ``remaining`` and left as they are.

    Raises
    ------
    RegistryError
        When ``path`` is not a folder, or ``registry.sqlite`` exists but is not a
        registry database (move it aside first).
    """
    path = Path(path)
    if not path.is_dir():
        raise RegistryError(f"No registry folder at {str(path)!r}.")
    report = RepairReport()
    with registry_lock.write_lock(path, timeout=lock_timeout):
        db = path / DB_NAME
        if not db.exists() or db.stat().st_size == 0:
            db.unlink(missing_ok=True)  # an empty file holds nothing
            with sqlite3.connect(db) as conn:
                conn.executescript(_SCHEMA)
            report.created_manifest = True
        reg = Registry(path, "w", lock_timeout=lock_timeout)
        try:
            report.recovered = reg._recover()
            bad = [r[0] for r in reg.conn.execute("SELECT id FROM esms")
                   if not is_valid_id(r[0])]
            with reg.conn:
                for esm_id in bad:
                    reg.conn.execute("DELETE FROM esms WHERE id = ?", (esm_id,))
                if bad:
                    reg._bump_generation()
            report.removed_rows = bad
            known = {e.id for e in reg.entries()}
            root = path / ESM_DIR
            for folder in sorted(root.iterdir()) if root.is_dir() else []:
                if folder.name in known:
                    continue
                why = _add_from_folder(reg, folder)
                if why:
                    report.refused[f"{ESM_DIR}/{folder.name}"] = why
                else:
                    report.added.append(folder.name)
            report.remaining = [p for p in reg.verify().problems
                                if not any(p.startswith(r) for r in report.refused)]
        finally:
            reg.close()
    return report


def _add_from_folder(reg: Registry, folder: Path) -> str:
    """Add a row for an ESM folder that has none; returns why not, or ''."""
    if folder.is_symlink() or not folder.is_dir():
        return "not an ESM folder (a file or a link); left alone"
    if not is_valid_id(folder.name):
        return "its name is not a valid ESM id; left alone"
    if not (folder / CONFIG_NAME).is_file():
        return f"no {CONFIG_NAME}: not an ESM folder; left alone"
    try:
        esm = EmbeddingSpaceMap.load(folder)
        check_finite(esm, what="its ESM")
    except (ESMFormatError, ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
        return f"unreadable ESM ({type(err).__name__}: {err}); left alone"
    cfg = esm.config
    enc = cfg.encoder_identity
    checksum, size = folder_checksum(folder)
    model = reg.path / MODEL_DIR / folder.name
    has_model = model.is_dir() and not model.is_symlink()
    row = (folder.name, cfg.task_id, enc.name, enc.fingerprint, enc.pooling, enc.max_length,
           enc.layer, cfg.in_dim, cfg.out_dim, cfg.architecture, cfg.num_examples,
           cfg.label_kind, len(cfg.classes), REBUILT_KEY_PREFIX + checksum, checksum, size,
           int(has_model), cfg.created or new_created(), None)
    with reg.conn:
        reg.conn.execute(f"INSERT INTO esms ({_COLS}) VALUES ({', '.join('?' * len(row))})",
                         row)
        reg._bump_generation()
    return ""


def new_created() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


DEFAULT_REGISTRY_ENV = "STEPSTONE_REGISTRY"


def default_registry_path() -> Path:
    """``$STEPSTONE_REGISTRY``, else the registry shipped inside this package."""
    env = os.environ.get(DEFAULT_REGISTRY_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "default_registry"


def open_registry(path: str | Path | None = None, mode: Literal["r", "w"] = "r") -> Registry:
    """Open ``path`` (default: the shipped or ``$STEPSTONE_REGISTRY`` registry), read-only
    unless ``mode="w"``."""
    return Registry(default_registry_path() if path is None else path, mode)
