"""The studies list, a study's timeline, and the jobs with their steps and errors.

These pages show what the node holds about patients' studies, so each view is a
``phi_read`` audit row for the signed-in token, as the API's and the CLI's listings are.
Retry and cancel buttons are shown to operators and admins only; they call the REST API
(``/api/v1/jobs/{id}/retry`` and ``/cancel``), which checks the role again.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from db.enums import JobState
from db.models import StudyStatus
from dicom_node.api.auth import Caller
from dicom_node.api.context import get_context
from dicom_node.dashboard import study_queries
from dicom_node.dashboard.rendering import page
from dicom_node.dashboard.session import PageCaller
from dicom_node.security import audit

router = APIRouter(include_in_schema=False)

ROWS = 200
RETRYABLE = frozenset({JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELLED})
CANCELLABLE = frozenset({JobState.QUEUED, JobState.RUNNING})


def record_phi_read(session: Session, caller: Caller, what: str, count: int) -> None:
    audit.record(
        session,
        action=audit.AuditAction.PHI_READ,
        actor=caller.actor,
        object_kind=audit.AuditObjectKind.REQUEST,
        object_id=f"GET {what} (dashboard)",
        count=count,
    )


@router.get("/studies")
def studies_page(
    request: Request,
    caller: PageCaller,
    status_filter: Annotated[str, Query(alias="status", max_length=16)] = "",
    modality: Annotated[str, Query(max_length=16)] = "",
) -> HTMLResponse:
    known_status = status_filter if status_filter in set(StudyStatus) else ""
    with get_context(request).sessions.begin() as session:
        rows = study_queries.study_rows(
            session, status=known_status or None, modality=modality.strip() or None, limit=ROWS
        )
        record_phi_read(session, caller, "/studies", len(rows))
    return page(
        request,
        "studies.html",
        caller,
        studies=rows,
        status_filter=known_status,
        modality=modality.strip(),
        statuses=[str(item) for item in StudyStatus],
        limit=ROWS,
    )


@router.get("/studies/{study_instance_uid}")
def study_page(request: Request, caller: PageCaller, study_instance_uid: str) -> HTMLResponse:
    with get_context(request).sessions.begin() as session:
        detail = study_queries.study_detail(session, study_instance_uid)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
        record_phi_read(session, caller, "/studies/{uid}", 1)
        return page(
            request,
            "study.html",
            caller,
            detail=detail,
            jobs=[(job, study_instance_uid) for job in detail.jobs],
            retryable=RETRYABLE,
            cancellable=CANCELLABLE,
        )


@router.get("/jobs")
def jobs_page(
    request: Request,
    caller: PageCaller,
    state: Annotated[str, Query(max_length=16)] = "",
    rule: Annotated[str, Query(max_length=128)] = "",
) -> HTMLResponse:
    known_state = state if state in set(JobState) else ""
    with get_context(request).sessions.begin() as session:
        rows = study_queries.job_rows(
            session, state=known_state or None, rule=rule.strip() or None, limit=ROWS
        )
        record_phi_read(session, caller, "/jobs", len(rows))
        return page(
            request,
            "jobs.html",
            caller,
            jobs=rows,
            state=known_state,
            rule=rule.strip(),
            states=[str(item) for item in JobState],
            retryable=RETRYABLE,
            cancellable=CANCELLABLE,
            limit=ROWS,
        )
