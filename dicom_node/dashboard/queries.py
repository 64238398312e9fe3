"""What the overview shows, read straight from the database: instances received and
studies completed over the last hours, the queues, turnaround and the failures to look at.

Counting by time bucket happens in SQL (``extract('epoch', ...)`` works on SQLite and
PostgreSQL alike), so a busy node's millions of instance rows never reach Python.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, cast, extract, func, select
from sqlalchemy.orm import Session

from db.enums import JobState
from db.models import Export, ExportState, Instance, Job, Output, Study, as_utc

TURNAROUND_STUDIES = 500


@dataclass(frozen=True)
class Activity:
    """Counts per bucket of ``bucket_seconds`` from ``start`` (oldest first)."""

    start: dt.datetime
    bucket_seconds: int
    instances: list[int]
    studies_completed: list[int]

    @property
    def instances_per_second(self) -> list[float]:
        return [count / self.bucket_seconds for count in self.instances]

    def bucket_start(self, index: int) -> dt.datetime:
        return self.start + dt.timedelta(seconds=index * self.bucket_seconds)


@dataclass(frozen=True)
class Turnaround:
    """Seconds from a study's last instance in to its last output delivered."""

    studies: int
    median_seconds: float | None
    slowest_seconds: float | None


@dataclass(frozen=True)
class Failure:
    kind: str  # "job" or "export"
    id: int
    what: str  # the rule (job) or the destination (export)
    error: str
    at: dt.datetime | None
    study_instance_uid: str | None


def activity(session: Session, now: dt.datetime, hours: int, buckets: int) -> Activity:
    bucket_seconds = max(1, hours * 3600 // buckets)
    start = now - dt.timedelta(seconds=bucket_seconds * buckets)
    return Activity(
        start=start,
        bucket_seconds=bucket_seconds,
        instances=_count_by_bucket(session, Instance.received_at, start, bucket_seconds, buckets),
        studies_completed=_count_by_bucket(
            session, Study.completed_at, start, bucket_seconds, buckets
        ),
    )


def _count_by_bucket(
    session: Session, column: Any, start: dt.datetime, bucket_seconds: int, buckets: int
) -> list[int]:
    epoch = cast(extract("epoch", column), Integer)
    bucket = (epoch - int(start.timestamp())) // bucket_seconds
    counts = [0] * buckets
    rows = session.execute(
        select(bucket, func.count()).where(column >= start).group_by(bucket)
    ).all()
    for index, count in rows:
        if index is not None and 0 <= int(index) < buckets:
            counts[int(index)] += int(count)
    return counts


def jobs_by_state(session: Session) -> dict[str, int]:
    counts = {str(state): 0 for state in JobState}
    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        counts[str(state)] = int(count)
    return counts


def exports_by_state(session: Session) -> dict[str, int]:
    counts = {str(state): 0 for state in ExportState}
    for state, count in session.execute(select(Export.state, func.count()).group_by(Export.state)):
        counts[str(state)] = int(count)
    return counts


def turnaround(session: Session, since: dt.datetime) -> Turnaround:
    """Over the studies completed since ``since`` whose outputs were all delivered."""
    last_delivered = func.max(Export.delivered_at)
    rows = session.execute(
        select(Study.last_received_at, last_delivered)
        .join(Job, Job.study_id == Study.id)
        .join(Output, Output.job_id == Job.id)
        .join(Export, Export.output_id == Output.id)
        .where(Study.completed_at >= since)
        .group_by(Study.id, Study.last_received_at)
        .having(func.count(Export.id) == func.count(Export.delivered_at))
        .order_by(Study.id.desc())
        .limit(TURNAROUND_STUDIES)
    ).all()
    seconds = [
        max(0.0, (as_utc(delivered) - as_utc(received)).total_seconds())
        for received, delivered in rows
        if delivered is not None
    ]
    if not seconds:
        return Turnaround(0, None, None)
    return Turnaround(len(seconds), statistics.median(seconds), max(seconds))


def recent_failures(session: Session, limit: int) -> list[Failure]:
    """The latest failed jobs and exports, newest first."""
    jobs = session.execute(
        select(Job, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == JobState.FAILED)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    exports = session.scalars(
        select(Export)
        .where(Export.state == ExportState.FAILED)
        .order_by(Export.id.desc())
        .limit(limit)
    ).all()
    failures = [
        Failure(
            "job",
            job.id,
            job.rule_name,
            job.error or "",
            _utc_or_none(job.finished_at),
            study_uid,
        )
        for job, study_uid in jobs
    ] + [
        Failure(
            "export",
            export.id,
            export.destination,
            export.last_error or "",
            _utc_or_none(export.next_attempt_at),
            None,
        )
        for export in exports
    ]
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    failures.sort(key=lambda failure: failure.at or oldest, reverse=True)
    return failures[:limit]


def _utc_or_none(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else as_utc(value)
