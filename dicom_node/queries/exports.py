"""Exports as people read them: a search by state, destination and study, and one export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from db.models import Export, ExportState, Instance, Output, Series, Study
from dicom_node.queries.paging import Page, Paging, UtcDateTime, count_of


class ExportView(BaseModel):
    """One instance to be sent to one destination, and what became of it so far."""

    model_config = {"from_attributes": True}

    id: int
    destination: str
    host: str = Field(description="Where it was (last) sent.")
    port: int
    ae_title: str
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    state: ExportState
    attempts: int = Field(ge=0)
    max_attempts: int = Field(ge=0)
    next_attempt_at: UtcDateTime | None
    last_error: str | None
    created_at: UtcDateTime | None
    delivered_at: UtcDateTime | None
    output_id: int | None = Field(description="The node's output it sends; none for a source.")
    commitment_uid: str | None = Field(
        None, description="Storage commitment: the transaction that (last) asked the PACS."
    )
    commitment_requested_at: UtcDateTime | None = None
    commitment_requests: int = Field(0, ge=0, description="Requests for this delivery.")
    committed_at: UtcDateTime | None = Field(
        None, description="When the PACS reported it committed (state committed)."
    )


def of_study(study_instance_uid: str) -> Any:
    """Exports of the study: outputs made from its series, and its own instances (sent
    de-identified to an outside destination)."""
    series_uids = (
        select(Series.series_instance_uid)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    instance_uids = (
        select(Instance.sop_instance_uid)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    outputs = select(Output.id).where(Output.source_series_uid.in_(series_uids))
    return or_(Export.output_id.in_(outputs), Export.sop_instance_uid.in_(instance_uids))


@dataclass(frozen=True)
class ExportFilters:
    """Which exports: in ``state``, to ``destination``, of the study ``study_instance_uid``;
    the newest first unless ``newest_first`` is False."""

    state: ExportState | None = None
    destination: str | None = None
    study_instance_uid: str | None = None
    newest_first: bool = True

    def conditions(self) -> list[Any]:
        found: list[Any] = []
        if self.state is not None:
            found.append(Export.state == self.state)
        if self.destination is not None:
            found.append(Export.destination == self.destination)
        if self.study_instance_uid is not None:
            found.append(of_study(self.study_instance_uid))
        return found


def search_exports(session: Session, filters: ExportFilters, paging: Paging) -> Page[ExportView]:
    matching = select(Export).where(*filters.conditions())
    order = Export.id.desc() if filters.newest_first else Export.id
    rows = session.scalars(paging.apply(matching.order_by(order)))
    return Page[ExportView](
        items=[ExportView.model_validate(row) for row in rows],
        total=count_of(session, matching.with_only_columns(Export.id)),
        limit=paging.limit,
        offset=paging.offset,
    )


def export_view(session: Session, export_id: int) -> ExportView | None:
    row = session.get(Export, export_id, populate_existing=True)
    return None if row is None else ExportView.model_validate(row)
