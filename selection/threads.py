"""Threads for per-map linear algebra: how many, and BLAS kept to one each.

ESM-LogME, the sketch index and its middle stage all do many small matrix products and
factorisations, one per ESM. BLAS threads do not pay at that size, and on top of our
own threads (or of a busy machine) they oversubscribe the cores: OpenBLAS's
spin-waiting then made a map 13x slower on the 2-core machine (20 ms vs 1.5 ms a
sketch, 2 s vs 0.1 s for a 1,000 x 48 SVD). So those parts run under
:func:`single_threaded_blas`, and ESM-LogME splits the maps between
:func:`default_n_jobs` threads itself (:func:`map_chunks`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

# Environment variable with the default thread count (see default_n_jobs).
THREADS_ENV = "STEPSTONE_THREADS"

__all__ = ["THREADS_ENV", "check_n_jobs", "default_n_jobs", "map_chunks",
           "single_threaded_blas"]

T = TypeVar("T")


def _available_cpus() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def default_n_jobs() -> int:
    """Threads ESM-LogME uses when ``n_jobs`` is None: ``$STEPSTONE_THREADS`` if set,
    else every CPU this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return _available_cpus()
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ValueError(f"${THREADS_ENV} must be a positive integer; got {value!r}.")
    return jobs


def check_n_jobs(n_jobs: int | None) -> int:
    """``n_jobs`` validated, None meaning :func:`default_n_jobs`."""
    if n_jobs is None:
        return default_n_jobs()
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs < 1:
        raise ValueError(f"'n_jobs' must be None or a positive integer; got {n_jobs!r}.")
    return int(n_jobs)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS (numpy's and scipy's) limited to one thread, process wide, meanwhile.

    Only BLAS: FAISS's OpenMP threads (the index search) keep their setting.
    """
    # scipy's own BLAS must be loaded before the limit, or it is not limited.
    import scipy.linalg  # noqa: F401  (comes with scikit-learn)
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def map_chunks(fn: Callable[[slice], T], n_items: int, chunk: int, n_jobs: int) -> list[T]:
    """``fn`` over consecutive slices of ``chunk`` items, on ``n_jobs`` threads."""
    slices = [slice(i, min(i + chunk, n_items)) for i in range(0, n_items, chunk)]
    if n_jobs <= 1 or len(slices) <= 1:
        return [fn(sl) for sl in slices]
    # The work must release the GIL (BLAS, LAPACK through ctypes) to run in parallel.
    with ThreadPoolExecutor(max_workers=min(n_jobs, len(slices))) as pool:
        return list(pool.map(fn, slices))
