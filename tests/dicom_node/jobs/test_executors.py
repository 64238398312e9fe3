"""Executors: inline, and an embedded Dask cluster (GPU resources, crashes, a hung job)."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from db.models import JobState
from dicom_node.assembler import complete_quiet_studies
from dicom_node.config import load_settings
from dicom_node.jobs import dispatcher as dispatcher_module
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import DaskExecutor, InlineExecutor
from dicom_node.jobs.worker import JobError, JobResult, JobSpec, worker_name
from dicom_node.routing_store import sync_from_settings
from dicom_node.storage import Spool
from dicom_node.testing import local_settings
from tests.dicom_node import test_routing
from tests.dicom_node.jobs import misbehaving
from tests.dicom_node.jobs.test_state import CT_RULE, LATER, jobs
from tests.dicom_node.test_routing import add_series

sessions = test_routing.sessions
spool = test_routing.spool


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


WORKER_MEMORY_LIMIT = "700MiB"


def test_inline_runs_at_once_and_keeps_the_error() -> None:
    assert InlineExecutor(echo).submit(spec(3)).result().job_id == 3
    future = InlineExecutor(fail).submit(spec(4))
    with pytest.raises(JobError) as raised:
        future.result()
    assert InlineExecutor().describe_failure(raised.value) == "job 4: no such series"


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskExecutor]:
    """Two workers, each with a GPU resource and a memory limit the nanny enforces."""
    settings = local_settings(
        tmp_path_factory.mktemp("dask"),
        executor="dask",
        dask_workers=2,
        dask_worker_gpus=1,
        dask_memory_limit=WORKER_MEMORY_LIMIT,
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


def set_allowed_failures(dask_scheduler: Any, value: int) -> None:
    dask_scheduler.allowed_failures = value


@pytest.mark.slow
def test_a_scheduler_that_hands_dead_workers_jobs_on_is_warned_about(
    gpu_cluster: DaskExecutor, tmp_path: Path
) -> None:
    address = gpu_cluster.client.scheduler.address
    client = gpu_cluster.client
    for allowed, warned in [(0, False), (3, True)]:
        client.run_on_scheduler(set_allowed_failures, value=allowed)
        settings = local_settings(tmp_path, executor="dask", scheduler_address=address)
        try:
            with capture_logs() as logs:
                DaskExecutor(settings, echo).close()
        finally:
            client.run_on_scheduler(set_allowed_failures, value=0)
        warnings = [e for e in logs if "ALLOWED_FAILURES=0" in e["event"]]
        assert [e["allowed_failures"] for e in warnings] == ([allowed] if warned else [])


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
        assert executor.gpu_workers() == 0
        # No GPU worker: a GPU job still runs rather than waiting for one forever.
        assert executor.submit(spec(4), gpu=True).result(timeout=60).job_id == 4
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


# -- faults through the dispatcher: each fails only its job --------------------------------


@dataclass
class Round:
    started: float
    seconds: float
    restarting: frozenset[str]
    """The workers being restarted at the end of the round."""
    running: frozenset[int]
    """The jobs running at the end of the round."""


def dispatch_until_done(
    dispatcher: Dispatcher, sessions: sessionmaker[Session], timeout: float = 120.0
) -> list[Round]:
    """Dispatcher rounds in this thread until every job has ended and no worker is being
    restarted; what each round took and left."""
    rounds = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        dispatcher.run_once()
        executor = dispatcher.executor
        assert isinstance(executor, DaskExecutor)
        rounds.append(
            Round(
                started,
                time.monotonic() - started,
                frozenset(executor.restarting()),
                frozenset(dispatcher._running),
            )
        )
        ended = all(job.state in (JobState.SUCCEEDED, JobState.FAILED) for job in jobs(sessions))
        if ended and not rounds[-1].restarting:
            return rounds
        time.sleep(0.05)
    raise AssertionError(f"jobs did not end: {[(j.id, j.state) for j in jobs(sessions)]}")


def dispatcher_for(
    executor: DaskExecutor,
    sessions: sessionmaker[Session],
    spool: Spool,
    tmp_path: Path,
    behaviours: list[str],
    **settings: object,
) -> Dispatcher:
    """One job per behaviour (made and claimed in that order), on ``executor``."""
    for number in range(1, len(behaviours) + 1):
        add_series(spool, sessions, number=number)
    config = load_settings(
        None, data_dir=tmp_path / "data", rules=[CT_RULE], executor="dask", **settings
    )
    with sessions.begin() as session:
        sync_from_settings(session, config)
        complete_quiet_studies(session, 1.0, now=LATER)
    dispatcher = Dispatcher(config, sessions, executor)
    executor._run = misbehaving.behave  # type: ignore[method-assign]
    dispatcher.reload_routing(force=True)
    assert dispatcher.route_completed_studies() == len(behaviours)
    config.outputs_dir.mkdir(parents=True, exist_ok=True)
    for job, behaviour in zip(jobs(sessions), behaviours, strict=True):
        (config.outputs_dir / f"job-{job.id}.do").write_text(behaviour)
    wait_for_workers(executor, 2)
    executor.client.run(importlib.import_module, misbehaving.__name__)  # not in the timeout
    return dispatcher


def wait_for_workers(executor: DaskExecutor, count: int, timeout: float = 60.0) -> None:
    """Until the cluster has ``count`` workers again (after an earlier test's restarts)."""
    deadline = time.monotonic() + timeout
    while len(executor._workers()) < count or executor.restarting():
        assert time.monotonic() < deadline, "the cluster's workers did not come back"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_hung_job_times_out_and_others_run_while_its_worker_restarts(
    gpu_cluster: DaskExecutor, sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    quick = ["sleep 1"] * 14  # some left to run after the hung job's timeout
    dispatcher = dispatcher_for(
        gpu_cluster, sessions, spool, tmp_path, ["hang", *quick], job_timeout_seconds=8.0
    )
    rounds = dispatch_until_done(dispatcher, sessions)
    hung, *others = jobs(sessions)
    assert (hung.state, hung.error) == (
        JobState.FAILED,
        "timed out after 8 s (job_timeout_seconds)",
    )
    assert [(job.state, job.attempts) for job in others] == [(JobState.SUCCEEDED, 1)] * len(
        quick
    ), [(job.id, job.error, job.worker) for job in jobs(sessions)] + [
        (r.started, r.seconds, r.restarting, r.running) for r in rounds
    ]
    # The restart (seconds) went on in the background: no round waited for it.
    during = [index for index, r in enumerate(rounds) if r.restarting]
    assert during, "the hung job's worker was not restarted"
    restarted = rounds[during[0]].restarting
    restart_seconds = rounds[during[-1]].started + rounds[during[-1]].seconds
    restart_seconds -= rounds[during[0]].started
    stall = max(r.seconds for r in rounds)
    assert restart_seconds > 3 * stall, (stall, restart_seconds)
    # Meanwhile jobs were submitted and ran to the end, none on the restarting worker.
    submitted = {job for i in during for job in rounds[i].running - rounds[i - 1].running}
    ended = {job for i in during[1:] for job in rounds[i - 1].running - rounds[i].running}
    assert submitted & ended, [(r.restarting, r.running) for r in rounds]
    assert not {job.worker for job in others} & restarted


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exit", "hog"])
def test_a_job_that_kills_its_worker_fails_alone_after_its_attempts(
    gpu_cluster: DaskExecutor,
    sessions: sessionmaker[Session],
    spool: Spool,
    tmp_path: Path,
    fault: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher_module, "RETRY_BASE_SECONDS", 0.1)
    dispatcher = dispatcher_for(
        gpu_cluster, sessions, spool, tmp_path, [fault, "sleep 4"], job_max_attempts=2
    )
    dispatch_until_done(dispatcher, sessions)
    killer, neighbour = jobs(sessions)
    # Each attempt failed at once (the scheduler gave it to no other worker), and the
    # job ended after its two.
    assert (killer.state, killer.attempts) == (JobState.FAILED, 2)
    assert killer.error is not None
    assert killer.error.startswith("the worker process died while running the job")
    assert (neighbour.state, neighbour.attempts) == (JobState.SUCCEEDED, 1)
