"""``/audit``: the audit trail, with the filters of ``dicom-node audit``. Admin only: the
trail names every token and address that did anything and which studies each read, which
is what an operator watching jobs does not need and an attacker with a stolen viewer token
would want. Each read is itself an ``audit_read`` row."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from db.enums import AuditAction, AuditActorKind, AuditObjectKind, AuditOutcome
from db.models import in_utc
from dicom_node.api.auth import AdminCaller
from dicom_node.api.resources import Context, StudyUidQuery, error_responses, record_read
from dicom_node.queries.since import BadMomentError, parse_since
from dicom_node.security import audit
from processors.errors import BadInputError

router = APIRouter(tags=["audit"])

AUDIT_MAX_LIMIT = 10_000
SINCE_PATTERN = (
    r"^(\d+(\.\d+)?\s*[smhdwSMHDW]"
    r"|\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    r"([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?)$"
)
"""What ``dicom_node.queries.since.parse_since`` reads, for ``/openapi.json``."""


class AuditEventView(BaseModel):
    """Who did what to which object, and how it ended."""

    id: int
    at: dt.datetime
    actor_kind: AuditActorKind
    actor: str
    actor_address: str | None
    action: AuditAction
    outcome: AuditOutcome
    reason: str | None
    object_kind: AuditObjectKind | None
    object_id: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    count: int | None
    details: dict[str, Any] | None


@router.get("/audit", summary="The audit trail, oldest first", responses=error_responses(422))
def read_audit(
    caller: AdminCaller,
    context: Context,
    request: Request,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=SINCE_PATTERN,
            description="Only events since: 30m, 1h, 7d, 2w or an ISO 8601 date or time.",
        ),
    ] = None,
    study: StudyUidQuery = None,
    action: Annotated[
        list[AuditAction] | None, Query(description="Only these actions; repeatable.")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=AUDIT_MAX_LIMIT, description="The latest N events.")
    ] = 100,
) -> list[AuditEventView]:
    try:
        moment = in_utc(parse_since(since)) if since is not None else None
    except BadMomentError as exc:
        raise BadInputError(f"since: {exc}") from exc
    query = audit.AuditQuery(
        since=moment,
        study_instance_uid=study,
        actions=tuple(action or ()),
        limit=limit,
    )
    with context.sessions.begin() as session:
        events = [
            AuditEventView.model_validate(audit.event_as_dict(event))
            for event in audit.read_events(session, query)
        ]
        record_read(
            session,
            caller,
            request,
            len(events),
            action=audit.AuditAction.AUDIT_READ,
            study_instance_uid=study,
        )
    return events
