"""/api/v1/jobs: search, read, retry and cancel, on jobs a real dispatcher made and runs;
a running job cancelled through the API is stopped by the dispatcher of the node that
runs it, and nothing of it is recorded or sent after the cancel."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import select

from db.enums import TokenRole
from db.models import Export, ExportState, Job, JobState, Output
from dicom_node.api.testing import ApiHarness
from dicom_node.config import Settings
from dicom_node.jobs.executors import InlineExecutor, JobFuture
from dicom_node.jobs.worker import JobResult, JobSpec, run_job
from dicom_node.security.audit import AuditAction
from tests.dicom_node.api.resource_support import (
    OTHER_STUDY_UID,
    Studies,
    api,
    audit_rows,
    dispatcher_with_jobs,
    get,
    node_settings,
    post,
    run_all,
    set_job_state,
    studies,
)

__all__ = ["api", "node_settings", "studies"]


def job_ids(api: ApiHarness) -> list[int]:
    with api.context.sessions() as session:
        return list(session.scalars(select(Job.id).order_by(Job.id)))


def rows(api: ApiHarness, model: type[Any]) -> list[Any]:
    with api.context.sessions() as session:
        return list(session.scalars(select(model)))


def test_search_and_read_jobs(api: ApiHarness, studies: Studies, node_settings: Settings) -> None:
    dispatcher_with_jobs(api, node_settings)
    first, second = job_ids(api)
    set_job_state(api, first, state=JobState.FAILED, error="boom")
    searches: list[tuple[dict[str, object], list[int]]] = [
        ({}, [second, first]),  # the newest first
        ({"state": "failed"}, [first]),
        ({"rule": "ct"}, [second, first]),
        ({"rule": "mr"}, []),
        ({"processor": "gaussian"}, [second, first]),
        ({"processor": "gauss"}, []),  # a whole name, not a part of one
        ({"study": OTHER_STUDY_UID}, [second]),
        ({"limit": 1, "offset": 1}, [first]),
    ]
    for params, expected in searches:
        page: Any = get(api, "/jobs", **params)
        assert [job["id"] for job in page["items"]] == expected, params
        assert page["total"] == (2 if "limit" in params else len(expected)), params
    job: Any = get(api, f"/jobs/{first}")
    assert (job["state"], job["error"]) == ("failed", "boom")
    assert job["pipeline"] == ["gaussian", "median"]
    assert job["series_instance_uid"] == studies.ct
    headers = api.headers(TokenRole.VIEWER)
    assert api.client.get("/api/v1/jobs/999", headers=headers).status_code == 404
    assert api.client.get(f"/api/v1/jobs/{2**63}", headers=headers).status_code == 422
    for bad in ({"state": "lost"}, {"study": "x"}, {"limit": 0}):
        assert api.client.get("/api/v1/jobs", params=bad, headers=headers).status_code == 422
    reads = audit_rows(api.context.sessions, AuditAction.PHI_READ)
    assert len(reads) == len(searches) + 1 and reads[-1]["count"] == 1


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_retry_a_failed_job(api: ApiHarness, studies: Studies, node_settings: Settings) -> None:
    dispatcher_with_jobs(api, node_settings)
    job_id = job_ids(api)[0]
    set_job_state(api, job_id, state=JobState.FAILED, attempts=3, error="boom")
    wakes = api.context.wake_dispatcher = Wakes()
    assert post(api, f"/jobs/{job_id}/retry", TokenRole.VIEWER)[0] == 403
    status, job = post(api, f"/jobs/{job_id}/retry")
    assert status == 200
    assert (job["state"], job["attempts"], job["error"]) == ("queued", 0, None)  # type: ignore[index]
    assert wakes.count == 1
    [asked] = audit_rows(api.context.sessions, AuditAction.RETRY_REQUESTED)
    assert (asked["actor_kind"], asked["actor"], asked["object_id"]) == (
        "api_token",
        "operator",
        str(job_id),
    )
    assert asked["details"]["was"] == "failed"
    status, refused = post(api, f"/jobs/{job_id}/retry")
    assert (status, refused) == (409, {"detail": f"job {job_id} is queued; nothing to retry"})
    assert post(api, "/jobs/999/retry")[0] == 404
    assert wakes.count == 1


def test_cancel_a_queued_job_then_retry_it(
    api: ApiHarness, studies: Studies, node_settings: Settings
) -> None:
    dispatcher = dispatcher_with_jobs(api, node_settings)
    cancelled, other = job_ids(api)
    wakes = api.context.wake_dispatcher = Wakes()
    status, job = post(api, f"/jobs/{cancelled}/cancel")
    assert (status, job["state"], wakes.count) == (200, "cancelled", 1)  # type: ignore[index]
    assert job["error"] == "cancelled by api_token operator"  # type: ignore[index]
    run_all(dispatcher)  # the other job only
    assert {job.id: job.state for job in rows(api, Job)} == {
        cancelled: JobState.CANCELLED,
        other: JobState.SUCCEEDED,
    }
    status, refused = post(api, f"/jobs/{other}/cancel")
    assert status == 409
    assert refused == {
        "detail": f"job {other} is succeeded; only a queued or running job can be cancelled"
    }
    [asked] = audit_rows(api.context.sessions, AuditAction.CANCEL_REQUESTED)
    assert (asked["actor"], asked["object_id"], asked["details"]["was"]) == (
        "operator",
        str(cancelled),
        "queued",
    )
    assert post(api, f"/jobs/{cancelled}/retry")[1]["state"] == "queued"  # type: ignore[index]
    run_all(dispatcher)
    assert {job.state for job in rows(api, Job)} == {JobState.SUCCEEDED}
    assert post(api, "/jobs/999/cancel")[0] == 404
    assert post(api, f"/jobs/{other}/cancel", TokenRole.VIEWER)[0] == 403


class ThreadExecutor(InlineExecutor):
    """Runs each job in a thread of its own, so that it is still running when the test
    cancels it; ``kill`` notes the future it was asked to stop."""

    def __init__(self, run: Callable[[JobSpec], JobResult]) -> None:
        super().__init__(run)
        self.killed: list[JobFuture] = []
        self.threads: list[threading.Thread] = []

    def submit(self, spec: JobSpec, *, gpu: bool = False) -> JobFuture:
        future: concurrent.futures.Future[JobResult] = concurrent.futures.Future()

        def work() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self._run(spec))
            except Exception as exc:
                future.set_exception(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        self.threads.append(thread)
        return future

    def kill(self, future: JobFuture) -> None:
        self.killed.append(future)


def test_a_running_job_cancelled_here_is_stopped_by_the_node_running_it(
    api: ApiHarness, studies: Studies, node_settings: Settings
) -> None:
    """Node "b" shares the database and runs the job; its first step's outputs are queued
    for export when an operator cancels it through this node's API."""
    release = threading.Event()

    def first_step_then_wait(spec: JobSpec) -> JobResult:
        first = run_job(replace(spec, pipeline=spec.pipeline[:1]))
        release.wait(60)
        return first

    node_b = node_settings.model_copy(update={"node_name": "node-b"})
    executor = ThreadExecutor(first_step_then_wait)
    dispatcher = dispatcher_with_jobs(api, node_b, executor)
    assert dispatcher.fill() == 1
    [running] = [job for job in rows(api, Job) if job.state == JobState.RUNNING]
    assert running.claimed_by == "node-b"
    deadline = time.monotonic() + 60
    while not rows(api, Export) and time.monotonic() < deadline:
        dispatcher.collect()  # the first step's outputs, sent while the job runs
        time.sleep(0.05)
    assert {e.state for e in rows(api, Export)} == {ExportState.PENDING}
    recorded = len(rows(api, Output))

    status, job = post(api, f"/jobs/{running.id}/cancel")
    assert (status, job["state"]) == (200, "cancelled")  # type: ignore[index]
    assert {e.state for e in rows(api, Export)} == {ExportState.CANCELLED}
    dispatcher.run_once()  # stops the run, then takes the next queued job
    assert len(executor.killed) == 1 and not executor.killed[0].done()
    release.set()
    for thread in executor.threads:
        thread.join(60)
    dispatcher.collect()
    [after] = [job for job in rows(api, Job) if job.id == running.id]
    assert (after.state, after.num_outputs, after.step_timings) == (JobState.CANCELLED, 0, None)
    assert len(rows(api, Output)) > recorded  # the other job's, recorded as usual
    with api.context.sessions() as session:
        mine = session.scalars(select(Output).where(Output.job_id == running.id)).all()
    assert len(mine) == recorded
    [asked] = audit_rows(api.context.sessions, AuditAction.CANCEL_REQUESTED)
    assert asked["details"]["was"] == "running"
    assert asked["details"]["exports_cancelled"] == recorded
    ran = audit_rows(api.context.sessions, AuditAction.JOB_RAN)
    assert running.id not in {int(row["object_id"]) for row in ran}


def test_a_run_that_ends_after_its_job_was_cancelled_records_nothing(
    api: ApiHarness, studies: Studies, node_settings: Settings
) -> None:
    dispatcher = dispatcher_with_jobs(api, node_settings)  # the inline executor
    assert dispatcher.fill() == 1  # it ran already; the dispatcher collects it next round
    [ran] = [job for job in rows(api, Job) if job.state == JobState.RUNNING]
    assert post(api, f"/jobs/{ran.id}/cancel")[0] == 200
    dispatcher.collect()
    assert (rows(api, Output), rows(api, Export)) == ([], [])
    assert audit_rows(api.context.sessions, AuditAction.JOB_RAN) == []
