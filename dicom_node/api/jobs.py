"""``/jobs``: search and read jobs (viewer and up); retry and cancel them (operator and up).

A cancel makes a queued or running job ``cancelled`` at once; the dispatcher running it,
on this node or another sharing the database, stops the run on its next round and
records none of it (``dicom_node.jobs.state.cancel``). Retry and cancel are audited
(``retry_requested``, ``cancel_requested``) in the transaction of the change and wake
this node's dispatcher.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from db.models import JobState
from dicom_node.api.auth import OperatorCaller, ViewerCaller
from dicom_node.api.resources import (
    MAX_ID,
    Context,
    PagingQuery,
    StudyUidQuery,
    error_responses,
    found,
    operate,
    record_read,
)
from dicom_node.jobs import state
from dicom_node.queries.jobs import JobFilters, JobView, job_view, search_jobs
from dicom_node.queries.paging import Page

router = APIRouter(tags=["jobs"])

JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="The job's id.")]


@router.get("/jobs", summary="Search the jobs", responses=error_responses(422))
def list_jobs(
    caller: ViewerCaller,
    context: Context,
    request: Request,
    paging: PagingQuery,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    rule: Annotated[str | None, Query(max_length=128, description="Made by this rule.")] = None,
    processor: Annotated[
        str | None, Query(max_length=128, description="Whose pipeline has this processor.")
    ] = None,
    study: StudyUidQuery = None,
) -> Page[JobView]:
    """The newest first, ``limit`` at a time."""
    filters = JobFilters(state=state, rule=rule, processor=processor, study_instance_uid=study)
    with context.sessions.begin() as session:
        page = search_jobs(session, filters, paging)
        record_read(session, caller, request, len(page.items), study_instance_uid=study)
    return page


@router.get("/jobs/{job_id}", summary="A job", responses=error_responses(404, 422))
def get_job(caller: ViewerCaller, context: Context, request: Request, job_id: JobId) -> JobView:
    with context.sessions.begin() as session:
        job = found(job_view(session, job_id), f"job {job_id}")
        record_read(session, caller, request, 1, study_instance_uid=job.study_instance_uid)
    return job


@router.post(
    "/jobs/{job_id}/retry",
    summary="Queue a failed, succeeded or cancelled job again, due now",
    responses=error_responses(404, 409, 422),
)
def retry_job(
    caller: OperatorCaller,
    context: Context,
    job_id: JobId,
    force: Annotated[
        bool, Query(description="Also a running job whose node is gone for good.")
    ] = False,
) -> JobView:
    job = operate(
        context,
        f"job {job_id}",
        lambda session: state.retry(session, job_id, force=force, actor=caller.actor),
        lambda session: job_view(session, job_id),
        state.JobStateConflictError,
    )
    context.wake_dispatcher()
    return job


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a queued or running job",
    responses=error_responses(404, 409, 422),
)
def cancel_job(caller: OperatorCaller, context: Context, job_id: JobId) -> JobView:
    """A queued job is cancelled at once; a running one too, and its run is stopped by
    the dispatcher that runs it. Its outputs not yet sent are not sent."""
    job = operate(
        context,
        f"job {job_id}",
        lambda session: state.cancel(session, job_id, actor=caller.actor),
        lambda session: job_view(session, job_id),
        state.JobStateConflictError,
    )
    context.wake_dispatcher()  # to stop the run at once if it runs here
    return job
