"""Executors: inline, and an embedded Dask cluster (GPU resources, crashes, a hung job)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.jobs.executors import DaskExecutor, InlineExecutor
from dicom_node.jobs.worker import JobError, JobResult, JobSpec, worker_name
from dicom_node.testing import local_settings


def spec(job_id: int = 1) -> JobSpec:
    return JobSpec(job_id, "1.2.3", ("x.dcm",), ("gaussian",), {}, "/tmp/out")


def echo(job: JobSpec) -> JobResult:
    return JobResult(job.job_id, (), (("echo", 0.0),), worker_name())


def fail(job: JobSpec) -> JobResult:
    raise JobError(f"job {job.job_id}: no such series")


def crash(job: JobSpec) -> JobResult:
    os._exit(9)


def start_a_process(job: JobSpec) -> JobResult:
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    child.start()
    child.join()
    assert child.exitcode == 0
    return echo(job)


def hang(job: JobSpec) -> JobResult:
    time.sleep(600)
    raise AssertionError("not reached")


def test_inline_runs_at_once_and_keeps_the_error() -> None:
    assert InlineExecutor(echo).submit(spec(3)).result().job_id == 3
    future = InlineExecutor(fail).submit(spec(4))
    with pytest.raises(JobError) as raised:
        future.result()
    assert InlineExecutor().describe_failure(raised.value) == "job 4: no such series"


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskExecutor]:
    settings = local_settings(
        tmp_path_factory.mktemp("dask"), executor="dask", dask_workers=2, dask_worker_gpus=1
    )
    executor = DaskExecutor(settings, echo)
    try:
        yield executor
    finally:
        executor.close()


@pytest.mark.slow
def test_dask_runs_jobs_in_worker_processes_with_gpu_resources(
    gpu_cluster: DaskExecutor,
) -> None:
    assert gpu_cluster.slots == 2 and gpu_cluster.gpu_workers() == 2
    result = gpu_cluster.submit(spec(1), gpu=True).result(timeout=60)
    assert result.worker.startswith("tcp://127.0.0.1:")
    assert str(os.getpid()) not in result.worker


@pytest.mark.slow
def test_dask_crash_and_timeout_fail_only_that_job(tmp_path: Path) -> None:
    executor = DaskExecutor(local_settings(tmp_path, executor="dask", dask_workers=1), echo)
    try:
        assert executor.gpu_workers() == 0
        # No GPU worker: a GPU job still runs rather than waiting for one forever.
        assert executor.submit(spec(1), gpu=True).result(timeout=60).job_id == 1
        executor._run = crash  # type: ignore[method-assign]
        with pytest.raises(Exception) as died:
            executor.submit(spec(2)).result(timeout=60)
        assert "worker process died" in executor.describe_failure(died.value)
        executor._run = hang  # type: ignore[method-assign]
        stuck = executor.submit(spec(3))
        time.sleep(1.0)
        executor.kill(stuck)
        executor._run = echo  # type: ignore[method-assign]
        assert executor.submit(spec(4)).result(timeout=60).job_id == 4
    finally:
        executor.close()


DASK_SWITCHES = (
    "distributed.nanny.pre-spawn-environ",
    "distributed.scheduler.allowed-failures",
    "distributed.worker.daemon",
    "distributed.admin.tick.limit",
    "logging",
)


@pytest.fixture
def without_thread_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dask's nannies copy their pre-spawn environment into this process's environment,
    where it overrides Dask's config for the next cluster: start from none."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's changes are undone
        monkeypatch.delenv(name)


@pytest.mark.slow
@pytest.mark.usefixtures("without_thread_pins")
def test_dask_settings_stay_with_the_embedded_cluster(tmp_path: Path) -> None:
    import dask
    import distributed  # noqa: F401  (its settings join dask's config on import)

    def switches() -> dict[str, object]:
        return {key: dask.config.get(key, None) for key in DASK_SWITCHES}

    before = switches()
    executor = DaskExecutor(local_settings(tmp_path, executor="dask", dask_workers=1), echo)
    try:
        assert switches() == before
        client = executor.client
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 0
        threads = {str(os.cpu_count() or 1)}
        assert set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()) == threads
        # A job may start processes of its own, also on a worker restarted after a crash.
        executor._run = start_a_process  # type: ignore[method-assign]
        assert executor.submit(spec(1)).result(timeout=60).job_id == 1
        executor._run = crash  # type: ignore[method-assign]
        with pytest.raises(Exception) as died:
            executor.submit(spec(2)).result(timeout=60)
        assert "worker process died" in executor.describe_failure(died.value)
        executor._run = start_a_process  # type: ignore[method-assign]
        assert executor.submit(spec(3)).result(timeout=60).job_id == 3
    finally:
        executor.close()
    assert switches() == before
