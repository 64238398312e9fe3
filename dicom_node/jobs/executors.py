"""Where jobs run: ``inline`` (in the calling thread; tests) or ``dask`` (worker processes).

Both hand back futures with ``done()`` and ``result()``. The Dask executor starts an
embedded ``distributed.LocalCluster`` (worker processes, one thread each) or connects to
``scheduler_address``. A worker process that dies under a job (a crash, ``os._exit``, the
nanny's memory limit) fails that job at once (``allowed-failures`` 0, so the scheduler does
not hand a poisonous job to the next worker), and ``kill`` restarts the worker that runs a
job past its timeout. The node's own process never runs plugin code with this executor.

GPU: workers that advertise a ``GPU`` resource (``dask_worker_gpus`` for the embedded
cluster; ``dask-cuda-worker ... --resources GPU=1`` for a cluster) get the jobs whose
pipeline needs CuPy or whose device is ``cuda``; see ``docs/operations.md``.

Nothing is left in Dask's process-wide config: the embedded cluster gets its settings as
arguments (the scheduler's ``allowed_failures``), for the time it is made (the workers'
pre-spawn environment, which each nanny keeps for its restarts) or from a worker plugin
(``_workers_may_start_processes``). Dask itself copies the workers' pre-spawn environment
(``OMP_NUM_THREADS`` and the like, ``PYTHONHASHSEED``) into the environment of the process
that runs the nannies, the node's; that is Dask's design and not undone here.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from dicom_node.config import Settings
from dicom_node.jobs.worker import JobResult, JobSpec, run_job

log = structlog.get_logger(__name__)

RESTART_TIMEOUT = 30.0
"""Seconds to wait for a restarted worker to come back before going on without it."""


class JobFuture(Protocol):
    def done(self) -> bool: ...

    def result(self, timeout: float | None = None) -> Any: ...


class Executor(Protocol):
    @property
    def slots(self) -> int:
        """How many jobs may run at once."""
        ...

    def submit(self, spec: JobSpec, *, gpu: bool = False) -> JobFuture: ...

    def kill(self, future: JobFuture) -> None:
        """Stop a job past its timeout (and whatever runs it)."""
        ...

    def describe_failure(self, exc: BaseException) -> str: ...

    def forget(self, future: JobFuture) -> None:
        """The result is recorded: drop it (a cluster would keep it, and even recompute
        it when the worker holding it dies)."""
        ...

    def close(self) -> None: ...


def _plain_failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if type(exc).__name__ != "JobError" else str(exc)


class InlineExecutor:
    """Runs each job in the caller's thread as it is submitted. No timeout, no isolation:
    for tests and debugging only."""

    def __init__(self, run: Callable[[JobSpec], JobResult] = run_job) -> None:
        self._run = run

    @property
    def slots(self) -> int:
        return 1

    def submit(self, spec: JobSpec, *, gpu: bool = False) -> JobFuture:
        future: concurrent.futures.Future[JobResult] = concurrent.futures.Future()
        try:
            future.set_result(self._run(spec))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def kill(self, future: JobFuture) -> None:
        return None

    def describe_failure(self, exc: BaseException) -> str:
        return _plain_failure(exc)

    def forget(self, future: JobFuture) -> None:
        return None

    def close(self) -> None:
        return None


def _worker_environ(settings: Settings) -> dict[str, str]:
    """Set before a worker process starts: Dask pins each worker's BLAS/OpenMP to one
    thread; a job is one task, so let each worker's libraries use its share of the cores."""
    threads = str(max(1, (os.cpu_count() or 1) // settings.effective_dask_workers))
    return {
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
    }


def _workers_may_start_processes() -> Any:
    """A worker plugin: the embedded cluster's worker processes may start processes of
    their own (a plugin's process pool). Dask's switch for this,
    ``distributed.worker.daemon``, is read from the process-wide config by the nanny at
    every (re)start of a worker, so no scope around the cluster's creation holds it;
    each worker process clears its own daemon flag instead."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class WorkersMayStartProcesses(WorkerPlugin):
        def setup(self, worker: object) -> None:
            multiprocessing.current_process().daemon = False

    return WorkersMayStartProcesses()


EMBEDDED_CLUSTER_QUIET = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.gil.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "200ms",
    "distributed.worker.memory.monitor-interval": "500ms",
}
"""An idle embedded cluster shares the machine with the receivers: no statistical
profiler (a sample every 10 ms), no GIL polling (every 1 ms), slower health checks. Its
idle worker took 0.4-0.5 ms of CPU per instance received while a study came in."""


class DaskExecutor:
    def __init__(self, settings: Settings, run: Callable[[JobSpec], JobResult] = run_job) -> None:
        import dask
        from distributed import Client, LocalCluster

        self._run = run
        self._cluster: Any = None
        if settings.scheduler_address:
            self.client: Any = Client(settings.scheduler_address, timeout=30)  # type: ignore[no-untyped-call]
        else:
            resources = {"GPU": settings.dask_worker_gpus} if settings.dask_worker_gpus else None
            # Each nanny reads this when it is made and keeps it for its worker's restarts.
            with dask.config.set(
                {
                    "distributed.nanny.pre-spawn-environ": _worker_environ(settings),
                    **EMBEDDED_CLUSTER_QUIET,
                }
            ):
                self._cluster = LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=settings.effective_dask_workers,
                    threads_per_worker=1,
                    processes=True,
                    memory_limit=settings.dask_memory_limit,
                    # No dashboard; the scheduler's HTTP endpoints (/health, /metrics) get a
                    # free port instead of 8787, which another cluster may hold.
                    dashboard_address=":0",
                    host="127.0.0.1",
                    resources=resources,
                    silence_logs=40,
                    scheduler_kwargs={"allowed_failures": 0},
                )
            self.client = Client(self._cluster)  # type: ignore[no-untyped-call]
            self.client.register_plugin(_workers_may_start_processes(), name="may-start-processes")
        workers = self.client.scheduler_info().get("workers", {})
        log.info(
            "dask executor ready",
            scheduler=self.client.scheduler.address,
            workers=len(workers),
            embedded=self._cluster is not None,
        )

    @property
    def slots(self) -> int:
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))

    def gpu_workers(self) -> int:
        """Workers advertising a ``GPU`` resource."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return sum(1 for w in workers.values() if w.get("resources", {}).get("GPU"))

    def submit(self, spec: JobSpec, *, gpu: bool = False) -> JobFuture:
        # Without GPU workers the job would wait forever for one; it runs on a CPU
        # worker instead (a processor that needs CuPy then fails with its reason).
        wants_gpu = gpu and self.gpu_workers() > 0
        return self.client.submit(  # type: ignore[no-any-return]
            self._run,
            spec,
            key=f"job-{spec.job_id}-{id(spec):x}",
            pure=False,
            resources={"GPU": 1} if wants_gpu else None,
        )

    def kill(self, future: JobFuture) -> None:
        key = getattr(future, "key", None)
        workers = [w for w, keys in self.client.processing().items() if key in keys]
        future.cancel()  # type: ignore[attr-defined]
        if workers:
            # Synchronous (a few seconds): a job submitted meanwhile could land on the
            # worker being restarted and die with it.
            self._restart(workers)

    def _restart(self, workers: list[str]) -> None:
        try:
            self.client.restart_workers(workers, timeout=RESTART_TIMEOUT, raise_for_error=False)
            log.info("restarted dask worker after a job timeout", workers=workers)
        except Exception:
            log.exception("could not restart the dask worker", workers=workers)

    def describe_failure(self, exc: BaseException) -> str:
        if type(exc).__name__ == "KilledWorker":
            return (
                "the worker process died while running the job (a crash, os._exit, or"
                f" out of memory): {exc}"
            )
        return _plain_failure(exc)

    def forget(self, future: JobFuture) -> None:
        future.release()  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            self.client.close(timeout=10)
        finally:
            if self._cluster is not None:
                self._cluster.close(timeout=10)


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "inline":
        return InlineExecutor()
    return DaskExecutor(settings)
