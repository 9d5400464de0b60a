"""The writers' lock of a registry folder: one ``flock`` on ``registry.lock``.

One writer at a time across processes and threads, re-entrant within a thread;
readers never take it (they only ask :func:`writer_active`, without creating
anything).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stepstone.esm.errors import RegistryError

logger = logging.getLogger("stepstone.esm.registry")

LOCK_NAME = "registry.lock"

_HELD: dict[tuple[str, int], list[int]] = {}  # (lock path, thread) -> [fd, depth]
_HELD_GUARD = threading.Lock()


@contextmanager
def write_lock(path: Path, *, timeout: float | None = None) -> Iterator[None]:
    """Exclusive ``flock`` on ``path/registry.lock``: one writer at a time across
    processes and threads; re-entrant within one thread."""
    key = (str((path / LOCK_NAME).resolve()), threading.get_ident())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is None:
        fd = os.open(key[0], os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _acquire(fd, path, timeout)
        except BaseException:
            os.close(fd)
            raise
        with _HELD_GUARD:
            _HELD[key] = held = [fd, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            done = held[1] == 0
            if done:
                del _HELD[key]
        if done:
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def _acquire(fd: int, path: Path, timeout: float | None) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    logger.warning("Registry %s: another process is writing it; waiting for it to finish.",
                   path)
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RegistryError(f"Registry {path} is still being written by another "
                                    f"process after {timeout:g}s; try again later.") from None
            time.sleep(0.05)


def writer_active(path: Path) -> bool:
    """Whether some process holds the write lock now (tested without creating anything)."""
    lock = path / LOCK_NAME
    if not lock.is_file():
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a shared lock we may have got
    return False


def holds_write_lock(path: Path) -> bool:
    """Whether this thread holds ``path``'s write lock now."""
    return (str((Path(path) / LOCK_NAME).resolve()), threading.get_ident()) in _HELD
