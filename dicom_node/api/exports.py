"""``/exports``: search and read exports (viewer and up); retry and cancel them (operator
and up). A cancelled export is never sent unless retried. Retry and cancel are audited
(``retry_requested``, ``cancel_requested``) in the transaction of the change; a retry
wakes this node's exporter."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from db.models import ExportState
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
from dicom_node.export import queue
from dicom_node.queries.exports import ExportFilters, ExportView, export_view, search_exports
from dicom_node.queries.paging import Page

router = APIRouter(tags=["exports"])

ExportId = Annotated[int, Path(ge=1, le=MAX_ID, description="The export's id.")]


@router.get("/exports", summary="Search the exports", responses=error_responses(422))
def list_exports(
    caller: ViewerCaller,
    context: Context,
    request: Request,
    paging: PagingQuery,
    state: Annotated[ExportState | None, Query(description="Only exports in this state.")] = None,
    destination: Annotated[
        str | None, Query(max_length=128, description="Only to this destination.")
    ] = None,
    study: StudyUidQuery = None,
) -> Page[ExportView]:
    """The newest first, ``limit`` at a time."""
    filters = ExportFilters(state=state, destination=destination, study_instance_uid=study)
    with context.sessions.begin() as session:
        page = search_exports(session, filters, paging)
        record_read(session, caller, request, len(page.items), study_instance_uid=study)
    return page


@router.get("/exports/{export_id}", summary="An export", responses=error_responses(404, 422))
def get_export(
    caller: ViewerCaller, context: Context, request: Request, export_id: ExportId
) -> ExportView:
    with context.sessions.begin() as session:
        export = found(export_view(session, export_id), f"export {export_id}")
        record_read(session, caller, request, 1)
    return export


@router.post(
    "/exports/{export_id}/retry",
    summary="Put an export back to pending, due now (attempts kept)",
    responses=error_responses(404, 409, 422),
)
def retry_export(caller: OperatorCaller, context: Context, export_id: ExportId) -> ExportView:
    export = operate(
        context,
        f"export {export_id}",
        lambda session: queue.retry(session, export_id, actor=caller.actor),
        lambda session: export_view(session, export_id),
        queue.ExportStateConflictError,
    )
    context.wake_exporter()
    return export


@router.post(
    "/exports/{export_id}/cancel",
    summary="Cancel a pending or failed export: it is not sent unless retried",
    responses=error_responses(404, 409, 422),
)
def cancel_export(caller: OperatorCaller, context: Context, export_id: ExportId) -> ExportView:
    return operate(
        context,
        f"export {export_id}",
        lambda session: queue.cancel(session, export_id, actor=caller.actor),
        lambda session: export_view(session, export_id),
        queue.ExportStateConflictError,
    )
