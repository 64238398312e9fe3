"""Where jobs run: ``inline`` (in the calling thread; tests) or ``dask`` (worker processes).

Both hand back futures with ``done()`` and ``result()``. The Dask executor starts an
embedded ``distributed.LocalCluster`` (worker processes, one thread each) or connects to
``scheduler_address``. A worker process that dies under a job (a crash, ``os._exit``, the
nanny's memory limit) fails that job at once (``allowed-failures`` 0, so the scheduler does
not hand a poisonous job to the next worker; the dispatcher runs it again while the job
has attempts left). ``kill`` restarts the worker that runs a job past its timeout in the
background: until it is back, that worker counts for no slot and new jobs are steered to
the other workers, so none lands on it and dies with it. The node's own process never runs
plugin code with this executor.

On an existing cluster (``scheduler_address``) each job's task key names the node
(``job_key_prefix``). A node killed while the cluster ran its jobs leaves their runs going
on the workers (Dask cannot stop a running task, only forget its result); when the node
starts again it restarts the workers still running its keys, before the dispatcher
queues those jobs again, so two runs of one job never write its outputs at once.

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
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from dicom_node.config import Settings
from dicom_node.jobs.worker import JobError, JobResult, JobSpec, run_job

log = structlog.get_logger(__name__)

RESTART_TIMEOUT = 30.0
"""Seconds to wait for a restarted worker to come back before going on without it."""

JOB_KEY_PREFIX = "dicom-node-job"


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
    """A ``JobError``'s reason as it is; any other exception named by its class."""
    return str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"


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
    their own (a plugin's process pool), and load the job code as they start. Dask's
    switch for the first, ``distributed.worker.daemon``, is read from the process-wide
    config by the nanny at every (re)start of a worker, so no scope around the cluster's
    creation holds it; each worker process clears its own daemon flag instead."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class WorkersMayStartProcesses(WorkerPlugin):
        def setup(self, worker: object) -> None:
            multiprocessing.current_process().daemon = False
            # A (re)started worker loads the job code before it takes a job, so that a
            # job's timeout does not count its worker's imports (seconds).
            import dicom_node.jobs.worker  # noqa: F401

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
        self._key_prefix = job_key_prefix(settings.effective_node_name)
        self._lock = threading.Lock()
        self._restarting: set[str] = set()
        self._restarts: list[threading.Thread] = []
        if self._cluster is None:
            self._check_scheduler()
            self.stop_orphaned_runs()
        workers = self.client.scheduler_info().get("workers", {})
        log.info(
            "dask executor ready",
            scheduler=self.client.scheduler.address,
            workers=len(workers),
            embedded=self._cluster is not None,
        )

    def _check_scheduler(self) -> None:
        allowed = self.client.run_on_scheduler(_scheduler_allowed_failures)
        if allowed != 0:
            log.warning(
                "the dask scheduler hands a job whose worker died to another worker:"
                " a job that kills its worker may kill several; start it with"
                " DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 (docs/operations.md)",
                allowed_failures=allowed,
            )

    def stop_orphaned_runs(self) -> list[str]:
        """Restart the workers still running jobs of an earlier run of this node (killed
        while the cluster ran them); returns their addresses. Waits for the restart:
        the dispatcher has not started yet."""
        running = self.client.run(_executing_keys, on_error="ignore")
        workers = [
            address
            for address, keys in running.items()
            if any(key.startswith(self._key_prefix) for key in keys)
        ]
        if workers:
            log.warning("stopping the runs this node left on the cluster", workers=workers)
            self._restart(workers)
        return workers

    def _workers(self) -> dict[str, Any]:
        workers: dict[str, Any] = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return workers

    def _usable_workers(self) -> dict[str, Any]:
        """The workers ready for a job: running (not starting, paused for memory or
        closing; the scheduler would queue a job behind a busy worker's rather than
        wait for them) and not being restarted by this node."""
        with self._lock:
            restarting = set(self._restarting)
        return {
            address: w
            for address, w in self._workers().items()
            if address not in restarting and w.get("status", "running") == "running"
        }

    @property
    def slots(self) -> int:
        """The threads of the usable workers; none while the cluster has workers but
        none usable (a job would wait behind another, its timeout running, or die with
        a worker being restarted); one while it has no workers at all (a job waits at
        the scheduler for one)."""
        usable = self._usable_workers()
        if not usable and (self.restarting() or self._workers()):
            return 0
        return max(1, sum(int(w.get("nthreads", 1)) for w in usable.values()))

    def gpu_workers(self) -> int:
        """Workers advertising a ``GPU`` resource."""
        return sum(1 for w in self._workers().values() if w.get("resources", {}).get("GPU"))

    def restarting(self) -> set[str]:
        """Addresses of the workers being restarted now."""
        with self._lock:
            return set(self._restarting)

    def submit(self, spec: JobSpec, *, gpu: bool = False) -> JobFuture:
        # Without GPU workers the job would wait forever for one; it runs on a CPU
        # worker instead (a processor that needs CuPy then fails with its reason).
        wants_gpu = gpu and self.gpu_workers() > 0
        usable: list[str] | None = None
        if self.restarting():
            # Loosely: should those go too, any worker will do rather than none.
            usable = list(self._usable_workers()) or None
        return self.client.submit(  # type: ignore[no-any-return]
            self._run,
            spec,
            key=f"{self._key_prefix}{spec.job_id}:{uuid.uuid4().hex[:12]}",
            pure=False,
            resources={"GPU": 1} if wants_gpu else None,
            workers=usable,
            allow_other_workers=usable is not None,
        )

    def kill(self, future: JobFuture) -> None:
        """Forget the job and restart its worker in the background: the caller (the
        dispatcher's thread) goes on at once, and the worker takes no new job until it
        is back."""
        key = getattr(future, "key", None)
        workers = [w for w, keys in self.client.processing().items() if key in keys]
        future.cancel()  # type: ignore[attr-defined]
        if not workers:
            return
        with self._lock:
            self._restarting.update(workers)
            self._restarts = [t for t in self._restarts if t.is_alive()]
            restart = threading.Thread(
                target=self._restart, args=(workers,), name="dask-worker-restart", daemon=True
            )
            self._restarts.append(restart)
        restart.start()

    def _restart(self, workers: Iterable[str]) -> None:
        workers = list(workers)
        started = time.monotonic()
        try:
            outcome = self.client.restart_workers(
                workers, timeout=RESTART_TIMEOUT, raise_for_error=False
            )
            log.info(
                "restarted dask workers",
                workers=outcome,
                seconds=round(time.monotonic() - started, 2),
            )
        except Exception:
            log.exception("could not restart the dask worker", workers=workers)
        finally:
            with self._lock:
                self._restarting.difference_update(workers)

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
        with self._lock:
            restarts = list(self._restarts)
        deadline = time.monotonic() + RESTART_TIMEOUT
        for restart in restarts:  # so that a hung job's worker is not left running
            restart.join(max(0.0, deadline - time.monotonic()))
        try:
            self.client.close(timeout=10)
        finally:
            if self._cluster is not None:
                self._cluster.close(timeout=10)


def job_key_prefix(node: str) -> str:
    """The start of the task keys of the jobs that node ``node`` submits."""
    return f"{JOB_KEY_PREFIX}:{node}:"


def _executing_keys(dask_worker: Any) -> list[str]:
    """On a worker: the keys of the tasks its threads run, forgotten ones included."""
    state = dask_worker.state
    return [str(task.key) for task in state.executing | state.long_running]


def _scheduler_allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "inline":
        return InlineExecutor()
    return DaskExecutor(settings)
