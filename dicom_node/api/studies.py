"""``/studies`` and ``/series``: what the node received, searched and shown in detail with
the jobs, outputs and exports made of it. Viewer and up; each read is a ``phi_read``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from db.models import StudyStatus
from dicom_node.api.auth import ViewerCaller
from dicom_node.api.resources import (
    UID_MAX_LENGTH,
    UID_PATTERN,
    Context,
    IsoDate,
    IsoDateTime,
    PagingQuery,
    error_responses,
    found,
    record_read,
)
from dicom_node.queries.paging import Page
from dicom_node.queries.studies import (
    SeriesDetail,
    StudyDetail,
    StudyFilters,
    StudySummary,
    search_studies,
    series_detail,
    study_detail,
)

router = APIRouter(tags=["studies"])

UidPath = Annotated[str, Path(pattern=UID_PATTERN, max_length=UID_MAX_LENGTH)]


@router.get(
    "/studies",
    summary="Search the studies received",
    responses=error_responses(422),
)
def list_studies(
    caller: ViewerCaller,
    context: Context,
    request: Request,
    paging: PagingQuery,
    received_from: Annotated[
        IsoDateTime | None, Query(description="Some of it received at or after (ISO 8601).")
    ] = None,
    received_to: Annotated[
        IsoDateTime | None, Query(description="Some of it received at or before (ISO 8601).")
    ] = None,
    study_date_from: Annotated[
        IsoDate | None, Query(description="StudyDate on or after (YYYY-MM-DD).")
    ] = None,
    study_date_to: Annotated[
        IsoDate | None, Query(description="StudyDate on or before (YYYY-MM-DD).")
    ] = None,
    modality: Annotated[
        str | None, Query(max_length=16, description="Has a series of this modality (CT).")
    ] = None,
    calling_ae_title: Annotated[
        str | None, Query(max_length=16, description="Sent (some of it) by this AE title.")
    ] = None,
    status: Annotated[StudyStatus | None, Query(description="receiving or complete.")] = None,
) -> Page[StudySummary]:
    """The newest first (by first instance received), ``limit`` at a time."""
    filters = StudyFilters(
        received_from=received_from,
        received_to=received_to,
        study_date_from=study_date_from,
        study_date_to=study_date_to,
        modality=modality,
        calling_ae_title=calling_ae_title,
        status=status,
    )
    with context.sessions.begin() as session:
        page = search_studies(session, filters, paging)
        record_read(session, caller, request, len(page.items))
    return page


@router.get(
    "/studies/{study_uid}",
    summary="A study: its series, jobs (with step timings), outputs and exports",
    responses=error_responses(404, 422),
)
def get_study(
    caller: ViewerCaller, context: Context, request: Request, study_uid: UidPath
) -> StudyDetail:
    with context.sessions.begin() as session:
        detail = found(study_detail(session, study_uid), f"study {study_uid}")
        record_read(session, caller, request, 1, study_instance_uid=study_uid)
    return detail


@router.get(
    "/series/{series_uid}",
    summary="A series: its instances, SOP classes and transfer syntaxes",
    responses=error_responses(404, 422),
)
def get_series(
    caller: ViewerCaller, context: Context, request: Request, series_uid: UidPath
) -> SeriesDetail:
    with context.sessions.begin() as session:
        detail = found(series_detail(session, series_uid), f"series {series_uid}")
        record_read(
            session,
            caller,
            request,
            1,
            study_instance_uid=detail.study_instance_uid,
            series_instance_uid=series_uid,
        )
    return detail
