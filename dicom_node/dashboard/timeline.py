"""A study's timeline, from what the REST API shows of it (``dicom_node.queries``) and its
``study_events``: first and last instance received, complete (or reopened), each job
queued, started, its steps, finished; each export delivered or failed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.enums import JobState
from db.models import ExportState, Study, StudyEvent, as_utc
from dicom_node.queries.exports import ExportView
from dicom_node.queries.jobs import JobView
from dicom_node.queries.studies import StudyDetail


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


def timeline(session: Session, study: StudyDetail) -> list[Moment]:
    moments = [
        Moment(study.first_received_at, "first instance received"),
        Moment(
            study.last_received_at,
            "last instance received",
            f"{study.num_instances} instances in {study.num_series} series",
        ),
    ]
    events = session.scalars(
        select(StudyEvent)
        .join(Study, Study.id == StudyEvent.study_id)
        .where(Study.study_instance_uid == study.study_instance_uid)
        .order_by(StudyEvent.id)
    )
    for event in events:
        moments.append(
            Moment(as_utc(event.at), f"study {event.event}", f"{event.num_instances} instances")
        )
    for job in study.jobs:
        moments.extend(_job_moments(job))
    job_of_output = {output.id: output.job_id for output in study.outputs}
    for export in study.exports:
        moments.extend(_export_moments(export, job_of_output.get(export.output_id or -1)))
    return sorted(moments, key=lambda moment: moment.at)


def _job_moments(job: JobView) -> list[Moment]:
    label = f"job {job.id} ({job.rule})"
    moments = []
    if job.created_at is not None:
        moments.append(Moment(job.created_at, f"{label} queued", " > ".join(job.pipeline)))
    if job.started_at is None:
        return moments
    moments.append(Moment(job.started_at, f"{label} started", job.worker or ""))
    for step in job.step_timings:
        moments.append(
            Moment(job.started_at, f"{label} step {step.step}", step_seconds=step.seconds)
        )
    if job.finished_at is not None and job.state in (JobState.SUCCEEDED, JobState.FAILED):
        failed = job.state == JobState.FAILED
        detail = job.error or "" if failed else f"{job.outputs} outputs"
        moments.append(Moment(job.finished_at, f"{label} {job.state}", detail, failed))
    return moments


def _export_moments(export: ExportView, job_id: int | None) -> list[Moment]:
    source = f"job {job_id}" if job_id is not None else "the study's own instance"
    what = f"export {export.id} to {export.destination} ({source})"
    if export.delivered_at is not None:
        return [Moment(export.delivered_at, f"{what} delivered")]
    at = export.next_attempt_at or export.created_at
    if at is None:
        return []
    failed = export.state == ExportState.FAILED
    detail = export.last_error or f"attempt {export.attempts} of {export.max_attempts}"
    return [Moment(at, f"{what} {export.state}", detail, failed)]
