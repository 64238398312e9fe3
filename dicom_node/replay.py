"""Dead letters sent again: the jobs and exports that used all their attempts.

A job or export that failed for good stays ``failed`` with its reason (``dicom-node jobs
--state failed``, ``dicom-node exports --state failed``): nothing is dropped silently.
``replay`` queues those that failed since a moment again, through the same ``retry`` as
one at a time (a job with fresh attempts; an export with one more attempt), each with its
``retry_requested`` audit row, in the caller's transaction.

Which: ``rule`` keeps the jobs of that rule and the exports of their outputs;
``destination`` keeps the exports to it (and no jobs: a job is not tied to one
destination); both together, the exports of that rule's outputs to that destination.
A job's moment is when it finished; an export's, when its last attempt was due.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Export, ExportState, Job, JobState, Output, in_utc
from dicom_node.export import queue
from dicom_node.jobs import state
from dicom_node.security import audit


@dataclass
class ReplayReport:
    """The ids queued again (or that would be, for a dry run)."""

    jobs: list[int] = field(default_factory=list)
    exports: list[int] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "exports": self.exports, "dry_run": self.dry_run}


def failed_jobs(session: Session, since: dt.datetime, rule: str | None) -> list[int]:
    query = select(Job.id).where(Job.state == JobState.FAILED, Job.finished_at >= in_utc(since))
    if rule is not None:
        query = query.where(Job.rule_name == rule)
    return list(session.scalars(query.order_by(Job.id)))


def failed_exports(
    session: Session, since: dt.datetime, rule: str | None, destination: str | None
) -> list[int]:
    query = select(Export.id).where(
        Export.state == ExportState.FAILED, Export.next_attempt_at >= in_utc(since)
    )
    if destination is not None:
        query = query.where(Export.destination == destination)
    if rule is not None:
        query = (
            query.join(Output, Output.id == Export.output_id)
            .join(Job, Job.id == Output.job_id)
            .where(Job.rule_name == rule)
        )
    return list(session.scalars(query.order_by(Export.id)))


def replay(
    session: Session,
    since: dt.datetime,
    *,
    actor: audit.Actor,
    rule: str | None = None,
    destination: str | None = None,
    dry_run: bool = False,
) -> ReplayReport:
    """Queue again what failed for good since ``since`` (see the module's docstring)."""
    jobs = [] if destination is not None else failed_jobs(session, since, rule)
    exports = failed_exports(session, since, rule, destination)
    report = ReplayReport(jobs, exports, dry_run)
    if dry_run:
        return report
    for job_id in jobs:
        state.retry(session, job_id, actor=actor)
    for export_id in exports:
        queue.retry(session, export_id, actor=actor)
    return report
