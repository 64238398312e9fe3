"""The overview and the audit page (admins only, as ``/api/v1/audit``), read from the
database."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from dicom_node.api.context import get_context
from dicom_node.api.resources import record_read
from dicom_node.dashboard import queries
from dicom_node.dashboard.charts import bar_chart
from dicom_node.dashboard.rendering import page
from dicom_node.dashboard.session import AdminPageCaller, PageCaller
from dicom_node.security import audit

router = APIRouter(include_in_schema=False)

CHART_BUCKETS = 60
FAILURES_SHOWN = 10
AUDIT_ROWS = 200


@router.get("/")
def overview(
    request: Request,
    caller: PageCaller,
    hours: Annotated[int, Query(ge=1, le=168)] = 6,
) -> HTMLResponse:
    now = audit.utcnow()
    with get_context(request).sessions() as session:
        activity = queries.activity(session, now, hours, CHART_BUCKETS)
        jobs = queries.jobs_by_state(session)
        exports = queries.exports_by_state(session)
        turnaround = queries.turnaround(session, now - dt.timedelta(hours=hours))
        failures = queries.recent_failures(session, FAILURES_SHOWN)
    labels = [f"{activity.bucket_start(index):%H:%M}" for index in range(len(activity.instances))]
    return page(
        request,
        "overview.html",
        caller,
        hours=hours,
        instances_total=sum(activity.instances),
        studies_total=sum(activity.studies_completed),
        instances_chart=bar_chart(activity.instances_per_second, labels, unit="instances/s"),
        studies_chart=bar_chart(
            activity.studies_completed, labels, unit="studies", value_format="{:.0f}"
        ),
        jobs=jobs,
        exports=exports,
        turnaround=turnaround,
        failures=failures,
    )


@router.get("/audit")
def audit_page(
    request: Request,
    caller: AdminPageCaller,
    hours: Annotated[int, Query(ge=1, le=24 * 365)] = 24,
    action: Annotated[str, Query(max_length=64)] = "",
    study: Annotated[str, Query(max_length=64)] = "",
) -> HTMLResponse:
    actions = [item for item in audit.AuditAction if item == action]
    query = audit.AuditQuery(
        since=audit.utcnow() - dt.timedelta(hours=hours),
        study_instance_uid=study.strip() or None,
        actions=actions,
        limit=AUDIT_ROWS,
    )
    with get_context(request).sessions.begin() as session:
        events = [audit.event_as_dict(event) for event in audit.read_events(session, query)]
        record_read(session, caller, request, len(events), action=audit.AuditAction.AUDIT_READ)
    return page(
        request,
        "audit.html",
        caller,
        events=list(reversed(events)),  # newest first
        hours=hours,
        action=action if actions else "",
        study=study.strip(),
        all_actions=[str(item) for item in audit.AuditAction],
        limit=AUDIT_ROWS,
    )
