"""Atomic writes: a file or folder is either whole or absent, even after a kill.

Everything is written under a temporary name next to its destination, fsynced, and
renamed into place (a rename within one file system is atomic on POSIX); the parent
folder is fsynced so the rename itself survives a power cut. One writer per
destination: the temporary name is fixed (``<name>.tmp``), so a rerun after a crash
clears what the crashed run left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "OLD_SUFFIX",
    "TMP_SUFFIX",
    "append_line",
    "atomic_path",
    "fsync_dir",
    "fsync_tree",
    "write_text_atomic",
]

TMP_SUFFIX = ".tmp"
# A folder being replaced is parked here for the instant between the two renames; a
# reader that finds no folder but this one may use it (it was complete).
OLD_SUFFIX = ".old"


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (new, renamed and removed names) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush a file, or every file and folder under a folder, to disk."""
    path = Path(path)
    if path.is_file():
        with path.open("rb") as f:
            os.fsync(f.fileno())
        return
    for sub in path.rglob("*"):
        if sub.is_file():
            with sub.open("rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """A temporary path for ``dest``; on a clean exit it replaces ``dest`` atomically.

    The caller writes a file or creates a folder at the yielded path (which does not
    exist yet; its parent does). On exit it is fsynced and renamed over ``dest``; an
    existing folder is first parked at ``dest.old`` and removed after the swap. On an
    exception the temporary path is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + TMP_SUFFIX)
    _remove(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and dest.exists():
        old = dest.with_name(dest.name + OLD_SUFFIX)
        _remove(old)
        dest.rename(old)
        tmp.rename(dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
        fsync_dir(dest.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def append_line(path: str | Path, text: str) -> None:
    """Append ``text`` and a newline with one ``write`` on an ``O_APPEND`` file, then
    fsync: concurrent appenders never interleave within a line, and a kill leaves at
    most a last line without its newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
