"""The studies list, a study's timeline, and the jobs with their steps and errors, read
with the REST API's own queries (``dicom_node.queries``).

These pages show what the node holds about patients' studies, so each view is a
``phi_read`` audit row for the signed-in token, as the API's and the CLI's listings are.
Retry and cancel buttons are shown to operators and admins only; they call the REST API
(``/api/v1/jobs/{id}/retry`` and ``/cancel``), which checks the role again.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse

from db.enums import JobState
from db.models import StudyStatus
from dicom_node.api.context import get_context
from dicom_node.api.resources import record_read
from dicom_node.dashboard.rendering import page
from dicom_node.dashboard.session import PageCaller
from dicom_node.dashboard.timeline import timeline
from dicom_node.queries.jobs import JobFilters, search_jobs
from dicom_node.queries.paging import Paging
from dicom_node.queries.studies import StudyFilters, search_studies, study_detail

router = APIRouter(include_in_schema=False)

ROWS = Paging(limit=200)
RETRYABLE = frozenset({JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELLED})
CANCELLABLE = frozenset({JobState.QUEUED, JobState.RUNNING})


@router.get("/studies")
def studies_page(
    request: Request,
    caller: PageCaller,
    status_filter: Annotated[StudyStatus | None, Query(alias="status")] = None,
    modality: Annotated[str, Query(max_length=16)] = "",
) -> HTMLResponse:
    filters = StudyFilters(modality=modality.strip() or None, status=status_filter)
    with get_context(request).sessions.begin() as session:
        found = search_studies(session, filters, ROWS)
        record_read(session, caller, request, len(found.items))
    return page(
        request,
        "studies.html",
        caller,
        studies=found,
        status_filter=status_filter or "",
        modality=modality.strip(),
        statuses=[str(item) for item in StudyStatus],
    )


@router.get("/studies/{study_instance_uid}")
def study_page(request: Request, caller: PageCaller, study_instance_uid: str) -> HTMLResponse:
    with get_context(request).sessions.begin() as session:
        detail = study_detail(session, study_instance_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
        moments = timeline(session, detail)
        record_read(session, caller, request, 1, study_instance_uid=study_instance_uid)
    return page(
        request,
        "study.html",
        caller,
        detail=detail,
        timeline=moments,
        retryable=RETRYABLE,
        cancellable=CANCELLABLE,
    )


@router.get("/jobs")
def jobs_page(
    request: Request,
    caller: PageCaller,
    state: Annotated[JobState | None, Query()] = None,
    rule: Annotated[str, Query(max_length=128)] = "",
) -> HTMLResponse:
    with get_context(request).sessions.begin() as session:
        found = search_jobs(session, JobFilters(state=state, rule=rule.strip() or None), ROWS)
        record_read(session, caller, request, len(found.items))
    return page(
        request,
        "jobs.html",
        caller,
        jobs=found,
        state=state or "",
        rule=rule.strip(),
        states=[str(item) for item in JobState],
        retryable=RETRYABLE,
        cancellable=CANCELLABLE,
    )
