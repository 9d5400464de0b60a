"""Run independent jobs here or on a Ray cluster, and yield their results as they finish.

A registry build (and the benchmark's transfer matrix) is one function mapped over
many independent jobs: one source fine-tune each. :class:`LocalExecutor` runs them
one after another in this process; :class:`RayExecutor` hands them to Ray
(https://docs.ray.io), which places each on a worker with ``num_cpus``/``num_gpus``
free and re-runs a job whose worker process died, up to ``max_retries`` times.
Jobs only compute and return artefacts; the caller (the driver) does every write,
so the registry keeps its single writer.

Ray is optional: it is imported only when a :class:`RayExecutor` opens, and a
missing install is an :class:`ExecutorUnavailableError` naming
``pip install 'stepstone[ray]'``.

Usage::

    with make_executor(ExecutorSettings(executor="ray", num_workers=4)) as ex:
        for result in ex.map(fn, [Job("a", {"x": 1}), Job("b", {"x": 2})],
                             shared={"model": "..."}, catch=(ValueError,)):
            ...  # JobResult(id, value | error), in completion order
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stepstone.esm.errors import ConfigError, StepstoneError

logger = logging.getLogger(__name__)

EXECUTORS: tuple[str, ...] = ("local", "ray")

#: Test-only fault injection for Ray jobs (read in the worker; see :func:`_crash_hook`).
CRASH_HOOK_ENV = "STEPSTONE_TEST_CRASH_DIR"

_JOB_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("job_device", default="cpu")


class ExecutorUnavailableError(StepstoneError, ImportError):
    """The chosen executor's engine is not installed (``pip install 'stepstone[ray]'``)."""


@dataclass
class ExecutorSettings:
    """Where independent jobs (one source fine-tune each) run."""

    executor: str = field(default="local", metadata={
        "help": "'local' (this process, one job after another) or 'ray' (a Ray cluster)."})
    ray_address: str | None = field(default=None, metadata={
        "help": "Ray cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'); default: a "
                "Ray session already open in this process, else a new local cluster."})
    num_workers: int | None = field(default=None, metadata={
        "help": "Ray jobs in flight at once (default: as many as the cluster's free "
                "CPUs/GPUs hold)."})
    cpus_per_job: float = field(default=1.0, metadata={
        "help": "CPU cores Ray reserves for each job (its torch thread count)."})
    gpus_per_job: float | None = field(default=None, metadata={
        "help": "GPUs Ray reserves for each job (default: 1 when the cluster has GPUs, "
                "else 0; fractions share a GPU)."})
    max_retries: int = field(default=2, metadata={
        "help": "Re-runs of a Ray job whose worker process died (errors raised by the job "
                "itself are reported, not retried)."})

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"'executor' must be one of {list(EXECUTORS)}; "
                              f"got {self.executor!r}.")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"'num_workers' must be >= 1 or None; got {self.num_workers}.")
        if self.cpus_per_job <= 0:
            raise ConfigError(f"'cpus_per_job' must be > 0; got {self.cpus_per_job}.")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            raise ConfigError(f"'gpus_per_job' must be >= 0 or None; got {self.gpus_per_job}.")
        if self.max_retries < 0:
            raise ConfigError(f"'max_retries' must be >= 0; got {self.max_retries}.")
        if self.executor == "local":
            ray_only = {k: getattr(self, k) for k in ("ray_address", "num_workers",
                                                      "gpus_per_job")
                        if getattr(self, k) is not None}
            if ray_only:
                raise ConfigError(f"{sorted(ray_only)} only apply to executor='ray'; got "
                                  f"executor='local' with {ray_only}.")


@dataclass(frozen=True)
class Job:
    """One independent job: an id (unique within a map) and its keyword arguments."""

    id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    """What a job returned (``value``), or why it failed (``error``).

    ``crashed``: the worker process died on every attempt (``attempts`` of them).
    ``seconds``: time inside the job function (on the worker), or until it failed.
    """

    id: str
    value: Any = None
    error: str | None = None
    crashed: bool = False
    attempts: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def job_device() -> str:
    """The torch device the running job was placed on: ``cuda`` when Ray gave it a GPU."""
    return _JOB_DEVICE.get()


def _check_ids(jobs: Sequence[Job]) -> None:
    seen: set[str] = set()
    dups = sorted({j.id for j in jobs if j.id in seen or seen.add(j.id)})
    if dups:
        raise ValueError(f"Job ids must be unique within a map; got duplicates {dups}.")


class LocalExecutor:
    """Run jobs one after another in this process (the default; needs no Ray)."""

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        self.settings = settings or ExecutorSettings()

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[Job],
        *,
        shared: Mapping[str, Any] | None = None,
        catch: tuple[type[BaseException], ...] = (),
        progress: bool = True,
        desc: str = "jobs",
        unit: str = "job",
    ) -> Iterator[JobResult]:
        """Yield ``fn(**job.kwargs, **shared)`` per job, in order.

        Exceptions of the ``catch`` types become ``JobResult.error``; others propagate.
        Each result is yielded before the next job starts, so a caller that stores
        it (the registry build) has it on disk before more work is done.
        """
        _check_ids(jobs)
        shared = dict(shared or {})
        with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
            for job in jobs:
                start = time.perf_counter()
                try:
                    value = fn(**job.kwargs, **shared)
                except catch as err:
                    logger.error("Job %s failed: %s", job.id, err)
                    result = JobResult(job.id, error=f"{type(err).__name__}: {err}",
                                       seconds=time.perf_counter() - start)
                else:
                    result = JobResult(job.id, value=value,
                                       seconds=time.perf_counter() - start)
                bar.update(1)
                yield result


def import_ray():
    """Import Ray, or raise :class:`ExecutorUnavailableError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorUnavailableError(
            "executor='ray' needs Ray, which is not installed; install it with "
            "`pip install 'stepstone[ray]'` or use executor='local'.") from None
    return ray


class RayExecutor:
    """Run jobs as Ray tasks; see the module docstring.

    Opening joins ``settings.ray_address``, or reuses a Ray session this process
    already has, or starts a local cluster; closing shuts down only what it opened.
    """

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self._ray = None
        self._opened = False
        self.num_gpus = 0.0

    def __enter__(self) -> RayExecutor:
        ray = import_ray()
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=self.settings.ray_address, include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=False)
            self._opened = True
        elif self.settings.ray_address is not None:
            logger.warning("Ray is already initialised in this process; using that session, "
                           "not ray_address=%r.", self.settings.ray_address)
        try:
            self._plan_resources()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._opened and self._ray is not None:
            self._ray.shutdown()
        self._opened = False

    def _plan_resources(self) -> None:
        resources = self._ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        s = self.settings
        self.num_gpus = (1.0 if gpus >= 1 else 0.0) if s.gpus_per_job is None \
            else float(s.gpus_per_job)
        if self.num_gpus > gpus:
            raise ConfigError(f"gpus_per_job={self.num_gpus} but the Ray cluster has {gpus:g} "
                              "GPU(s); every job would wait forever.")
        if s.cpus_per_job > cpus:
            raise ConfigError(f"cpus_per_job={s.cpus_per_job} but the Ray cluster has {cpus:g} "
                              "CPU(s); every job would wait forever.")
        capacity = int(cpus // s.cpus_per_job)
        if self.num_gpus > 0:
            capacity = min(capacity, int(gpus // self.num_gpus))
        self.capacity = max(1, capacity)
        self.in_flight = s.num_workers or self.capacity
        if s.num_workers and s.num_workers > self.capacity:
            logger.warning("num_workers=%d but the cluster holds %d jobs at once (%g CPUs, "
                           "%g GPUs); the rest wait in Ray's queue.", s.num_workers,
                           self.capacity, cpus, gpus)
        logger.info("Ray: %g CPUs, %g GPUs; %d job(s) in flight, %g CPU + %g GPU each.",
                    cpus, gpus, self.in_flight, s.cpus_per_job, self.num_gpus)

    def map(
        self,
        fn: Callable[..., Any],
        jobs: Sequence[Job],
        *,
        shared: Mapping[str, Any] | None = None,
        catch: tuple[type[BaseException], ...] = (),
        progress: bool = True,
        desc: str = "jobs",
        unit: str = "job",
    ) -> Iterator[JobResult]:
        """Yield one :class:`JobResult` per job, in completion order.

        ``fn`` must be importable on the workers (a module-level function).
        ``shared`` values are put in Ray's object store once, not once per job.
        Exceptions of the ``catch`` types raised by ``fn`` become ``error``; a worker
        that died on all ``1 + max_retries`` attempts gives ``crashed=True``; any
        other exception propagates (and the jobs still running are cancelled).
        """
        if self._ray is None:
            raise RuntimeError("Open the executor first: `with RayExecutor(settings) as ex:`.")
        ray = self._ray
        from ray.exceptions import RayError, RayTaskError

        _check_ids(jobs)
        s = self.settings
        remote = ray.remote(_run_in_worker).options(
            num_cpus=s.cpus_per_job, num_gpus=self.num_gpus, max_retries=s.max_retries,
            retry_exceptions=False)
        shared_refs = {k: ray.put(v) for k, v in (shared or {}).items()}
        todo = list(jobs)[::-1]
        pending: dict[Any, tuple[Job, float]] = {}
        bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress)
        try:
            while todo or pending:
                while todo and len(pending) < self.in_flight:
                    job = todo.pop()
                    ref = remote.remote(fn, job.id, dict(job.kwargs), **shared_refs)
                    pending[ref] = (job, time.perf_counter())
                done, _ = ray.wait(list(pending), num_returns=1)
                job, submitted = pending.pop(done[0])
                try:
                    value, seconds = ray.get(done[0])
                except RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if not isinstance(cause, catch):
                        raise
                    logger.error("Job %s failed: %s", job.id, cause)
                    result = JobResult(job.id, error=f"{type(cause).__name__}: {cause}",
                                       seconds=time.perf_counter() - submitted)
                except RayError as err:  # the worker process or its node died
                    attempts = s.max_retries + 1
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    logger.error("Job %s: worker died on all %d attempt(s): %s", job.id,
                                 attempts, first)
                    result = JobResult(
                        job.id, crashed=True, attempts=attempts,
                        error=f"worker died on all {attempts} attempt(s) "
                              f"({type(err).__name__}: {first})",
                        seconds=time.perf_counter() - submitted)
                else:
                    result = JobResult(job.id, value=value, seconds=seconds)
                bar.update(1)
                yield result
        finally:
            bar.close()
            for ref in pending:
                ray.cancel(ref, force=True)


def make_executor(settings: ExecutorSettings | None = None) -> LocalExecutor | RayExecutor:
    """The executor ``settings.executor`` names (open it with ``with``)."""
    settings = settings or ExecutorSettings()
    if settings.executor == "ray":
        return RayExecutor(settings)
    return LocalExecutor(settings)


# -- on the worker ----------------------------------------------------------------------
def _run_in_worker(fn: Callable[..., Any], job_id: str, kwargs: dict[str, Any],
                   **shared: Any) -> tuple[Any, float]:
    import ray
    import torch

    # torch's intra-op threads = the CPUs Ray reserved for this job (a reused worker
    # keeps the count of its first job otherwise). Bitwise-equal results to a local
    # run need the same thread count: float sums are ordered by thread.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    crash = _crash_hook(job_id)
    token = _JOB_DEVICE.set("cuda" if ray.get_gpu_ids() else "cpu")
    start = time.perf_counter()
    try:
        value = fn(**kwargs, **shared)
    finally:
        _JOB_DEVICE.reset(token)
        if crash is not None:
            crash.cancel()  # the job ended first: do not kill the next one
    return value, time.perf_counter() - start


def _crash_hook(job_id: str) -> threading.Timer | None:
    """Fault injection for tests: kill this worker process while it runs ``job_id``.

    Active only in Ray workers and only when ``$STEPSTONE_TEST_CRASH_DIR`` names a
    folder. Each attempt appends a line to ``<job>.attempts`` there. A file
    ``<job>.crash-once`` is consumed by the first attempt, which then dies after
    the number of seconds the file holds (so mid-job); ``<job>.crash-always``
    kills every attempt the same way.
    """
    folder = os.environ.get(CRASH_HOOK_ENV)
    if not folder:
        return None
    stem = Path(folder) / re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)
    with open(f"{stem}.attempts", "a") as f:
        f.write(f"{os.getpid()}\n")
    delay = None
    once = Path(f"{stem}.crash-once")
    try:
        delay = float(once.read_text() or 0)
        once.unlink()
    except FileNotFoundError:
        always = Path(f"{stem}.crash-always")
        if always.exists():
            delay = float(always.read_text() or 0)
    if delay is None:
        return None
    timer = threading.Timer(delay, os._exit, args=(17,))
    timer.daemon = True
    timer.start()
    return timer
