"""What the studies, timeline and jobs pages show, read from the database: a study's list
row, its timeline (received, complete, each job and its steps, each export) and jobs."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.enums import JobState
from db.models import Export, Instance, Job, Output, Series, Study, StudyEvent
from dicom_node.index import as_utc


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    status: str
    study_date: str | None
    modalities: str
    num_series: int
    num_instances: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    completed_at: dt.datetime | None


@dataclass(frozen=True)
class Moment:
    """One line of a study's timeline. A job's step is placed at its job's start and shows
    its duration (``step_seconds``): the steps' own start times are not recorded, and the
    encoding of one step overlaps the next one's run."""

    at: dt.datetime
    what: str
    detail: str = ""
    failed: bool = False
    step_seconds: float | None = None


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    num_instances: int


@dataclass
class StudyDetail:
    study: StudyRow
    series: list[SeriesRow]
    jobs: list[Job]
    timeline: list[Moment] = field(default_factory=list)


def study_rows(
    session: Session, *, status: str | None, modality: str | None, limit: int
) -> list[StudyRow]:
    """The latest studies first."""
    query = (
        select(
            Study,
            func.count(func.distinct(Series.id)),
            func.count(Instance.id),
        )
        .outerjoin(Series, Series.study_id == Study.id)
        .outerjoin(Instance, Instance.series_id == Series.id)
        .group_by(Study.id)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(Study.status == status)
    if modality:
        query = query.where(
            Study.id.in_(select(Series.study_id).where(Series.modality == modality))
        )
    found = session.execute(query).all()
    modalities: dict[int, set[str]] = {}
    for study_id, series_modality in session.execute(
        select(Series.study_id, Series.modality)
        .where(Series.study_id.in_([study.id for study, _, _ in found]))
        .distinct()
    ):
        if series_modality:
            modalities.setdefault(study_id, set()).add(series_modality)
    return [
        _study_row(study, num_series, num_instances, modalities.get(study.id, set()))
        for study, num_series, num_instances in found
    ]


def _study_row(study: Study, num_series: int, num_instances: int, modalities: set[str]) -> StudyRow:
    return StudyRow(
        study_instance_uid=study.study_instance_uid,
        status=str(study.status),
        study_date=study.study_date,
        modalities=", ".join(sorted(modalities)),
        num_series=int(num_series),
        num_instances=int(num_instances),
        first_received_at=as_utc(study.first_received_at),
        last_received_at=as_utc(study.last_received_at),
        completed_at=None if study.completed_at is None else as_utc(study.completed_at),
    )


def study_detail(session: Session, study_instance_uid: str) -> StudyDetail | None:
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if study is None:
        return None
    series_counts = session.execute(
        select(Series, func.count(Instance.id))
        .outerjoin(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.id)
    ).all()
    series = [
        SeriesRow(
            row.series_instance_uid,
            row.modality,
            row.series_number,
            row.series_description,
            int(count),
        )
        for row, count in series_counts
    ]
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))
    total = sum(row.num_instances for row in series)
    modalities = {row.modality for row in series if row.modality}
    detail = StudyDetail(_study_row(study, len(series), total, modalities), series, jobs)
    detail.timeline = _timeline(session, study, detail)
    return detail


def _timeline(session: Session, study: Study, detail: StudyDetail) -> list[Moment]:
    moments = [
        Moment(as_utc(study.first_received_at), "first instance received"),
        Moment(
            as_utc(study.last_received_at),
            "last instance received",
            f"{detail.study.num_instances} instances in {detail.study.num_series} series",
        ),
    ]
    for event in session.scalars(
        select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id)
    ):
        moments.append(
            Moment(as_utc(event.at), f"study {event.event}", f"{event.num_instances} instances")
        )
    for job in detail.jobs:
        moments.extend(_job_moments(job))
    exports = session.execute(
        select(Export, Output.job_id)
        .join(Output, Output.id == Export.output_id)
        .where(Output.job_id.in_([job.id for job in detail.jobs]))
        .order_by(Export.id)
    ).all()
    for export, job_id in exports:
        moments.append(_export_moment(export, job_id))
    return sorted(moments, key=lambda moment: moment.at)


def _job_moments(job: Job) -> list[Moment]:
    label = f"job {job.id} ({job.rule_name})"
    moments = [Moment(as_utc(job.created_at), f"{label} queued", " > ".join(job.pipeline))]
    if job.started_at is None:
        return moments
    started = as_utc(job.started_at)
    moments.append(Moment(started, f"{label} started", job.worker or ""))
    for step in job.step_timings or []:
        seconds = float(step.get("seconds", 0.0))
        moments.append(Moment(started, f"{label} step {step.get('step')}", step_seconds=seconds))
    if job.finished_at is not None and job.state in (JobState.SUCCEEDED, JobState.FAILED):
        failed = job.state == JobState.FAILED
        detail = job.error or "" if failed else f"{job.num_outputs} outputs"
        moments.append(Moment(as_utc(job.finished_at), f"{label} {job.state}", detail, failed))
    return moments


def _export_moment(export: Export, job_id: int | None) -> Moment:
    what = f"export {export.id} to {export.destination} (job {job_id})"
    if export.delivered_at is not None:
        return Moment(as_utc(export.delivered_at), f"{what} delivered")
    failed = str(export.state) == "failed"
    return Moment(
        as_utc(export.next_attempt_at),
        f"{what} {export.state}",
        export.last_error or f"attempt {export.attempts} of {export.max_attempts}",
        failed,
    )


def job_rows(
    session: Session, *, state: str | None, rule: str | None, limit: int
) -> list[tuple[Job, str]]:
    """The latest jobs first, each with its study's UID."""
    query = (
        select(Job, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Job.state == state)
    if rule:
        query = query.where(Job.rule_name == rule)
    return [(job, uid) for job, uid in session.execute(query)]
