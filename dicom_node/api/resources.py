"""What the read-and-operate routes (studies, jobs, exports, audit) share: paging
parameters, the error bodies they document, and the audit row of a read."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, BeforeValidator
from sqlalchemy.orm import Session

from dicom_node.api.auth import Caller
from dicom_node.api.context import ApiContext, get_context
from dicom_node.queries.paging import DEFAULT_LIMIT, MAX_LIMIT, Paging
from dicom_node.security import audit
from processors.errors import BadInputError

ViewT = TypeVar("ViewT")

NUMBER = re.compile(r"[+-]?\d+(\.\d*)?")


def _not_a_number(value: object) -> object:
    """Pydantic reads a number as seconds since 1970; a person means a date."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        raise ValueError("expected an ISO 8601 date or time, not a number")
    return value


IsoDate = Annotated[dt.date, BeforeValidator(_not_a_number)]
IsoDateTime = Annotated[dt.datetime, BeforeValidator(_not_a_number)]

MAX_ID = 2**31 - 1
"""Ids are SQL ``INTEGER``: 32 bits on PostgreSQL."""

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
UID_MAX_LENGTH = 64


class ErrorDetail(BaseModel):
    """Why the request was refused."""

    detail: str


class InvalidParameters(BaseModel):
    """A parameter is not valid: FastAPI's list of the parameters it refused, each with its
    location (``["query", "limit"]``), or one sentence naming the parameters (a range whose
    start is after its end)."""

    detail: str | list[dict[str, Any]]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route, for ``/openapi.json``: ``codes`` and the
    401 and 403 of every route that takes a token."""
    documented: dict[int, tuple[type[BaseModel], str]] = {
        status.HTTP_401_UNAUTHORIZED: (ErrorDetail, "No token, or an unknown or revoked one"),
        status.HTTP_403_FORBIDDEN: (ErrorDetail, "The token's role is too low"),
        status.HTTP_404_NOT_FOUND: (ErrorDetail, "No such object"),
        status.HTTP_409_CONFLICT: (ErrorDetail, "The object's state does not allow it"),
        status.HTTP_422_UNPROCESSABLE_CONTENT: (InvalidParameters, "A parameter is not valid"),
    }
    answers = (status.HTTP_401_UNAUTHORIZED, status.HTTP_403_FORBIDDEN, *codes)
    return {
        code: {"model": documented[code][0], "description": documented[code][1]} for code in answers
    }


def paging(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="At most this many.")] = (
        DEFAULT_LIMIT
    ),
    offset: Annotated[int, Query(ge=0, le=MAX_ID, description="Skip this many first.")] = 0,
) -> Paging:
    return Paging(limit=limit, offset=offset)


PagingQuery = Annotated[Paging, Depends(paging)]
Context = Annotated[ApiContext, Depends(get_context)]
StudyUidQuery = Annotated[
    str | None,
    Query(pattern=UID_PATTERN, max_length=UID_MAX_LENGTH, description="A Study Instance UID."),
]


def found(value: ViewT | None, what: str) -> ViewT:
    """``value``, or a 404 saying there is no ``what``."""
    if value is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no {what}")
    return value


def operate(
    context: ApiContext,
    what: str,
    change: Callable[[Session], object | None],
    view: Callable[[Session], ViewT | None],
    conflicts: type[BadInputError],
) -> ViewT:
    """Make ``change`` (it audits itself) in one transaction and answer ``view`` of the
    object after it: a 404 when ``change`` finds no ``what``, a 409 with the reason when
    the object's state refuses it (``conflicts``)."""
    with context.sessions.begin() as session:
        try:
            found(change(session), what)
        except conflicts as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
        return found(view(session), what)


def record_read(
    session: Session,
    caller: Caller,
    request: Request,
    count: int,
    *,
    action: audit.AuditAction = audit.AuditAction.PHI_READ,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> None:
    """Record that ``caller`` was shown ``count`` rows of what the node holds about
    patients (``phi_read``) or of the audit trail (``audit_read``), in ``session``'s
    transaction. The object is the request: its method and path (UIDs at most)."""
    audit.record(
        session,
        action=action,
        actor=caller.actor,
        object_kind=audit.AuditObjectKind.REQUEST,
        object_id=f"{request.method} {request.url.path}"[: audit.NAME_LIMIT],
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        count=count,
    )
