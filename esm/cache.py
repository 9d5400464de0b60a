"""On-disk embedding cache: one SQLite file, one row per (encoder key, text).

The key of a row is the encoder's cache key (weights fingerprint, pooling, max
length, layer) and the SHA-256 of the exact input text, so the same text is never
embedded twice by the same encoder configuration, whatever batch it comes in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE_ENV = "STEPSTONE_CACHE"
CACHE_FILE = "embeddings.sqlite"
_CHUNK = 500  # SQLite's default limit on host parameters is 999 (older builds)


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


class EmbeddingCache:
    """Persistent store of embedding vectors keyed by (encoder key, text digest).

    Parameters
    ----------
    directory : path, optional
        Folder for ``embeddings.sqlite``; defaults to :func:`default_cache_dir`.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CACHE_FILE
        self._conn = sqlite3.connect(self.path, timeout=60)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS embeddings (key TEXT NOT NULL, digest BLOB NOT NULL, "
            "dim INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (key, digest)) WITHOUT ROWID"
        )
        self._conn.commit()

    def get(self, key: str, digests: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        """Cached vectors (float32, shape (dim,)) for the digests that have one."""
        found: dict[bytes, np.ndarray] = {}
        for start in range(0, len(digests), _CHUNK):
            chunk = list(digests[start:start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT digest, dim, vector FROM embeddings WHERE key = ? AND digest IN ({marks})",
                [key, *chunk],
            )
            for digest, row_dim, blob in rows:
                if row_dim == dim and len(blob) == 4 * dim:
                    found[bytes(digest)] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, key: str, digests: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store ``vectors`` (shape (len(digests), dim)) in one transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO embeddings (key, digest, dim, vector) VALUES (?, ?, ?, ?)",
                [(key, d, dim, v.tobytes()) for d, v in zip(digests, vectors, strict=True)],
            )

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        self._conn.close()
