"""Studies as people read them: a search (received when, study date, modality, sender,
status), a study with its series, jobs, outputs and exports, a series with its instances."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session, aliased

from db.models import (
    Association,
    Instance,
    Output,
    OutputKind,
    Series,
    Study,
    StudyStatus,
    in_utc,
)
from dicom_node.queries.exports import ExportFilters, ExportView, search_exports
from dicom_node.queries.jobs import JobFilters, JobView, search_jobs
from dicom_node.queries.paging import EVERYTHING, Page, Paging, UtcDateTime, count_of
from processors.errors import BadInputError


class StudySummary(BaseModel):
    """A study as the node received it: counts, modalities, senders, times, status."""

    study_instance_uid: str
    status: StudyStatus
    study_date: str | None = Field(description="The study's StudyDate, YYYYMMDD, if sent.")
    num_series: int = Field(ge=0)
    num_instances: int = Field(ge=0)
    modalities: list[str]
    calling_ae_titles: list[str] = Field(description="The AE titles that sent it.")
    first_received_at: UtcDateTime
    last_received_at: UtcDateTime
    completed_at: UtcDateTime | None
    purged_at: UtcDateTime | None = Field(
        None, description="When retention deleted its files (the index keeps its rows)."
    )


class SeriesSummary(BaseModel):
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    num_instances: int = Field(ge=0)


class OutputView(BaseModel):
    """A DICOM object the node made from one of the study's series."""

    model_config = {"from_attributes": True}

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    kind: OutputKind
    series_instance_uid: str
    source_series_uid: str
    processor_name: str
    processor_version: str
    job_id: int | None
    created_at: UtcDateTime
    purged_at: UtcDateTime | None = None


class StudyDetail(StudySummary):
    series: list[SeriesSummary]
    jobs: list[JobView] = Field(description="Oldest first, each with its step timings.")
    outputs: list[OutputView]
    exports: list[ExportView] = Field(
        description="Of its outputs, and of its own instances (a de-identified copy)."
    )


class InstanceView(BaseModel):
    model_config = {"from_attributes": True}

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    size_bytes: int = Field(ge=0)
    received_at: UtcDateTime
    purged_at: UtcDateTime | None = None


class SeriesDetail(SeriesSummary):
    study_instance_uid: str
    sop_class_uids: list[str] = Field(description="Every SOP class among its instances.")
    transfer_syntax_uids: list[str] = Field(description="Every transfer syntax they came in.")
    instances: list[InstanceView] = Field(description="By instance number.")


@dataclass(frozen=True)
class StudyFilters:
    """Which studies: received (some of it) between ``received_from`` and ``received_to``,
    with a StudyDate between ``study_date_from`` and ``study_date_to``, with a series of
    ``modality``, sent (some of it) by ``calling_ae_title``, in ``status``. The newest
    first (by first instance received) unless ``newest_first`` is False."""

    received_from: dt.datetime | None = None
    received_to: dt.datetime | None = None
    study_date_from: dt.date | None = None
    study_date_to: dt.date | None = None
    modality: str | None = None
    calling_ae_title: str | None = None
    status: StudyStatus | None = None
    newest_first: bool = True

    def __post_init__(self) -> None:
        for low, high in (("received_from", "received_to"), ("study_date_from", "study_date_to")):
            start, end = getattr(self, low), getattr(self, high)
            if start is not None and end is not None and _comparable(start) > _comparable(end):
                raise BadInputError(f"{low} is after {high}")

    def conditions(self) -> list[Any]:
        found: list[Any] = []
        if self.received_from is not None:
            found.append(Study.last_received_at >= in_utc(self.received_from))
        if self.received_to is not None:
            found.append(Study.first_received_at <= in_utc(self.received_to))
        if self.study_date_from is not None:  # DICOM DA (YYYYMMDD) sorts as it reads
            found.append(Study.study_date >= self.study_date_from.strftime("%Y%m%d"))
        if self.study_date_to is not None:
            found.append(Study.study_date <= self.study_date_to.strftime("%Y%m%d"))
        # Aliases: the search joins the study's series and instances for its counts.
        series, instance = aliased(Series), aliased(Instance)
        if self.modality is not None:
            found.append(
                select(series.id)
                .where(series.study_id == Study.id, series.modality == self.modality)
                .correlate(Study)
                .exists()
            )
        if self.calling_ae_title is not None:
            found.append(
                select(instance.id)
                .join(series, series.id == instance.series_id)
                .join(Association, Association.id == instance.association_id)
                .where(
                    series.study_id == Study.id,
                    Association.calling_ae_title == self.calling_ae_title,
                )
                .correlate(Study)
                .exists()
            )
        if self.status is not None:
            found.append(Study.status == self.status)
        return found


def _comparable(value: dt.date | dt.datetime) -> dt.date | dt.datetime:
    return in_utc(value) if isinstance(value, dt.datetime) else value


def _with_counts() -> Select[Study, int, int]:
    return (
        select(Study, func.count(func.distinct(Series.id)), func.count(Instance.id))
        .outerjoin(Series, Series.study_id == Study.id)
        .outerjoin(Instance, Instance.series_id == Series.id)
        .group_by(Study.id)
    )


def _by_study(rows: Any) -> dict[int, list[str]]:
    found: dict[int, set[str]] = {}
    for study_id, value in rows:
        if value:
            found.setdefault(study_id, set()).add(value.strip())
    return {study_id: sorted(values) for study_id, values in found.items()}


def _summaries(session: Session, rows: Sequence[Row[Study, int, int]]) -> list[StudySummary]:
    ids = [study.id for study, _, _ in rows]
    modalities = _by_study(
        session.execute(select(Series.study_id, Series.modality).where(Series.study_id.in_(ids)))
    )
    senders = _by_study(
        session.execute(
            select(Series.study_id, Association.calling_ae_title)
            .join(Instance, Instance.series_id == Series.id)
            .join(Association, Association.id == Instance.association_id)
            .where(Series.study_id.in_(ids))
            .distinct()
        )
    )
    return [
        StudySummary(
            study_instance_uid=study.study_instance_uid,
            status=study.status,
            study_date=study.study_date,
            num_series=num_series,
            num_instances=num_instances,
            modalities=modalities.get(study.id, []),
            calling_ae_titles=senders.get(study.id, []),
            first_received_at=study.first_received_at,
            last_received_at=study.last_received_at,
            completed_at=study.completed_at,
            purged_at=study.purged_at,
        )
        for study, num_series, num_instances in rows
    ]


def search_studies(session: Session, filters: StudyFilters, paging: Paging) -> Page[StudySummary]:
    conditions = filters.conditions()
    if filters.newest_first:
        order = (Study.first_received_at.desc(), Study.id.desc())
    else:
        order = (Study.first_received_at.asc(), Study.id.asc())
    rows = session.execute(paging.apply(_with_counts().where(*conditions).order_by(*order)))
    return Page[StudySummary](
        items=_summaries(session, rows.all()),
        total=count_of(session, select(Study.id).where(*conditions)),
        limit=paging.limit,
        offset=paging.offset,
    )


def study_detail(session: Session, study_instance_uid: str) -> StudyDetail | None:
    row = session.execute(
        _with_counts().where(Study.study_instance_uid == study_instance_uid)
    ).one_or_none()
    if row is None:
        return None
    study = row[0]
    series = session.execute(
        select(Series, func.count(Instance.id))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.id)
        .order_by(Series.series_number.is_(None), Series.series_number, Series.id)
    )
    source_uids = select(Series.series_instance_uid).where(Series.study_id == study.id)
    outputs = session.scalars(
        select(Output).where(Output.source_series_uid.in_(source_uids)).order_by(Output.id)
    )
    [summary] = _summaries(session, [row])
    return StudyDetail(
        **summary.model_dump(),
        series=[SeriesSummary(**_series_summary(one, count)) for one, count in series],
        jobs=search_jobs(
            session,
            JobFilters(study_instance_uid=study_instance_uid, newest_first=False),
            EVERYTHING,
        ).items,
        outputs=[OutputView.model_validate(output) for output in outputs],
        exports=search_exports(
            session,
            ExportFilters(study_instance_uid=study_instance_uid, newest_first=False),
            EVERYTHING,
        ).items,
    )


def _series_summary(series: Series, num_instances: int) -> dict[str, Any]:
    return {
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "series_number": series.series_number,
        "series_description": series.series_description,
        "body_part_examined": series.body_part_examined,
        "num_instances": num_instances,
    }


def series_detail(session: Session, series_instance_uid: str) -> SeriesDetail | None:
    row = session.execute(
        select(Series, Study.study_instance_uid)
        .join(Study, Study.id == Series.study_id)
        .where(Series.series_instance_uid == series_instance_uid)
    ).one_or_none()
    if row is None:
        return None
    series, study_uid = row
    instances = list(
        session.scalars(
            select(Instance)
            .where(Instance.series_id == series.id)
            .order_by(Instance.instance_number.is_(None), Instance.instance_number, Instance.id)
        )
    )
    return SeriesDetail(
        **_series_summary(series, len(instances)),
        study_instance_uid=study_uid,
        sop_class_uids=sorted({i.sop_class_uid for i in instances}),
        transfer_syntax_uids=sorted({i.transfer_syntax_uid for i in instances}),
        instances=[InstanceView.model_validate(instance) for instance in instances],
    )
