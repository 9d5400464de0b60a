"""On-disk embedding cache: one SQLite file, one row per (encoder key, text).

The key of a row is the encoder's cache key (weights fingerprint, pooling, max
length, layer) and the SHA-256 of the exact input text, so the same text is never
embedded twice by the same encoder configuration, whatever batch it comes in.

The cache holds only derived data, so it never stops a run: a corrupt file (not a
database, a damaged page, a foreign table) is deleted and rebuilt empty with a
warning that names it, and a file another process keeps locked past
:data:`LOCK_TIMEOUT` is skipped for the rest of the run with a warning. Only a cache
that cannot be created at all raises :class:`CacheError`, naming the path and
``--no-cache``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from stepstone.esm.errors import StepstoneError

logger = logging.getLogger(__name__)

CACHE_ENV = "STEPSTONE_CACHE"
CACHE_FILE = "embeddings.sqlite"
LOCK_TIMEOUT = 60.0  # seconds to wait for another process's lock before skipping the cache
_CHUNK = 500  # SQLite's default limit on host parameters is 999 (older builds)
_COLUMNS = ["key", "digest", "dim", "vector"]
_SIDE_FILES = ("-wal", "-shm", "-journal")
_T = TypeVar("_T")


class CacheError(StepstoneError, OSError):
    """The embedding cache cannot be created or rebuilt (the message names the path)."""


def default_cache_dir() -> Path:
    """``$STEPSTONE_CACHE`` or ``~/.cache/stepstone``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stepstone"


def text_digest(text: str | tuple[str, str]) -> bytes:
    """SHA-256 of an input text, or of a (text, pair) tuple."""
    if isinstance(text, tuple):
        payload = "\x00pair\x00" + text[0] + "\x1f" + text[1]
    else:
        payload = text
    return hashlib.sha256(payload.encode("utf-8")).digest()


class _Corrupt(Exception):
    """The file is a database, but not one this cache wrote."""


def _kind(err: sqlite3.Error) -> str:
    """'locked', 'corrupt' or 'other' for an sqlite error."""
    name = getattr(err, "sqlite_errorname", "") or ""
    text = str(err).lower()
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return "locked"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "not a database" in text \
            or "malformed" in text:
        return "corrupt"
    return "other"


class EmbeddingCache:
    """Persistent store of embedding vectors keyed by (encoder key, text digest).

    Parameters
    ----------
    directory : path, optional
        Folder for ``embeddings.sqlite``; defaults to :func:`default_cache_dir`.
    timeout : float, optional
        Seconds to wait for another process's lock (default :data:`LOCK_TIMEOUT`);
        after that the cache is skipped for this run, with a warning.

    Raises
    ------
    CacheError
        When the folder cannot be created, or a corrupt file cannot be rebuilt.
    """

    def __init__(self, directory: str | Path | None = None, *,
                 timeout: float | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.path = self.directory / CACHE_FILE
        self.timeout = LOCK_TIMEOUT if timeout is None else float(timeout)
        self._conn: sqlite3.Connection | None = None
        try:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(0, "it is a file, not a folder")
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(
                f"Cannot use the embedding cache folder {str(self.directory)!r}: "
                f"{err.strerror or err}. Pass --no-cache (cache=False) to run without it, or "
                f"point {CACHE_ENV} (build: --cache-dir) at another folder.") from None
        try:
            self._conn = self._connect()
        except (sqlite3.DatabaseError, _Corrupt) as err:
            self._failed(err, "open")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (key TEXT NOT NULL, digest BLOB NOT NULL, "
                "dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (key, digest)) "
                "WITHOUT ROWID")
            conn.commit()
            columns = [row[1] for row in conn.execute("PRAGMA table_info(embeddings)")]
            if columns != _COLUMNS:
                raise _Corrupt(f"its embeddings table has the columns {columns}, "
                               f"not {_COLUMNS}")
        except (sqlite3.Error, _Corrupt):
            conn.close()
            raise
        return conn

    def _failed(self, err: Exception, what: str) -> None:
        """Rebuild a corrupt file, or skip a locked one for the rest of the run."""
        kind = "corrupt" if isinstance(err, _Corrupt) else _kind(err)  # type: ignore[arg-type]
        self.close()
        if kind == "locked":
            logger.warning(
                "Embedding cache %s is locked by another process (waited %.1fs to %s it); "
                "this run embeds without it. Pass --no-cache to skip the cache.", self.path,
                self.timeout, what)
            return
        if kind != "corrupt":
            raise CacheError(f"Embedding cache {str(self.path)!r} cannot be used ({err}). Pass "
                             "--no-cache (cache=False) to run without it.") from None
        logger.warning(
            "Embedding cache %s is corrupt (%s); it holds only derived data, so it is deleted "
            "and rebuilt empty (texts are embedded again). Pass --no-cache to skip the cache.",
            self.path, err)
        try:
            for suffix in ("", *_SIDE_FILES):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._conn = self._connect()
        except (OSError, sqlite3.Error, _Corrupt) as again:
            raise CacheError(
                f"Embedding cache {str(self.path)!r} is corrupt ({err}) and could not be "
                f"rebuilt ({again}); delete it, or pass --no-cache (cache=False).") from None

    def _run(self, what: str, op: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        """``op`` on the open connection; after a rebuild it runs once more on the new,
        empty file; a locked or skipped cache gives ``default``."""
        for _ in range(2):
            if self._conn is None:
                return default
            try:
                return op(self._conn)
            except (sqlite3.DatabaseError, _Corrupt) as err:
                self._failed(err, what)
        return default

    def get(self, key: str, digests: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        """Cached vectors (float32, shape (dim,)) for the digests that have one."""
        def op(conn: sqlite3.Connection) -> dict[bytes, np.ndarray]:
            found: dict[bytes, np.ndarray] = {}
            for start in range(0, len(digests), _CHUNK):
                chunk = list(digests[start:start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT digest, dim, vector FROM embeddings WHERE key = ? AND digest IN "
                    f"({marks})", [key, *chunk])
                for digest, row_dim, blob in rows:
                    if row_dim == dim and len(blob) == 4 * dim:
                        found[bytes(digest)] = np.frombuffer(blob, dtype=np.float32)
            return found

        return self._run("read", op, {})

    def put(self, key: str, digests: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store ``vectors`` (shape (len(digests), dim)) in one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        rows = [(key, d, dim, v.tobytes()) for d, v in zip(digests, vectors, strict=True)]

        def op(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO embeddings (key, digest, dim, vector) "
                                 "VALUES (?, ?, ?, ?)", rows)

        self._run("write", op, None)

    @property
    def active(self) -> bool:
        """False once the cache is skipped for this run (locked by another process)."""
        return self._conn is not None

    def __len__(self) -> int:
        return self._run("count", lambda c: c.execute("SELECT COUNT(*) FROM embeddings")
                         .fetchone()[0], 0)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
