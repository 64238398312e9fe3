"""Complete-study detection: a study is complete once nothing has arrived for it for a quiet time.

The state lives in the ``studies`` table and every change is an ``study_events`` row, so
it survives restarts; the routing stage consumes the unconsumed ``complete`` events.
An instance arriving after completion reopens the study (see ``dicom_node.index``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Series, Study, StudyEvent, StudyEventKind, StudyStatus
from dicom_node.security import audit

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StudyCompleted:
    study_id: int
    study_instance_uid: str
    num_instances: int
    completed_at: dt.datetime


StudyListener = Callable[[StudyCompleted], None]


def count_instances(session: Session, study_id: int) -> int:
    return (
        session.scalar(
            select(func.count(Instance.id)).join(Series).where(Series.study_id == study_id)
        )
        or 0
    )


def complete_quiet_studies(
    session: Session, quiet_seconds: float, now: dt.datetime | None = None
) -> list[StudyCompleted]:
    """Mark every study quiet for ``quiet_seconds`` complete, in the caller's transaction."""
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(seconds=quiet_seconds)
    query = select(Study).where(
        Study.status == StudyStatus.RECEIVING, Study.last_received_at <= cutoff
    )
    if session.get_bind().dialect.name == "postgresql":
        # Several nodes share the database: each quiet study is completed by one of them.
        query = query.with_for_update(skip_locked=True)
    completed = []
    for study in session.scalars(query):
        num_instances = count_instances(session, study.id)
        changed = session.execute(
            update(Study)
            .where(Study.id == study.id, Study.status == StudyStatus.RECEIVING)
            .values(status=StudyStatus.COMPLETE, completed_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if not changed:
            continue
        session.add(
            StudyEvent(
                study_id=study.id,
                event=StudyEventKind.COMPLETE,
                at=now,
                num_instances=num_instances,
            )
        )
        audit.record(
            session,
            action=audit.AuditAction.STUDY_COMPLETED,
            actor=audit.Actor.node("assembler"),
            object_kind=audit.AuditObjectKind.STUDY,
            study_instance_uid=study.study_instance_uid,
            count=num_instances,
            at=now,
        )
        completed.append(StudyCompleted(study.id, study.study_instance_uid, num_instances, now))
    return completed


class StudyAssembler:
    """Runs the completion check and tells listeners (the routing stage) what completed."""

    def __init__(self, sessions: sessionmaker[Session], quiet_seconds: float) -> None:
        self._sessions = sessions
        self._quiet_seconds = quiet_seconds
        self._listeners: list[StudyListener] = []

    def subscribe(self, listener: StudyListener) -> None:
        self._listeners.append(listener)

    def check(self, now: dt.datetime | None = None) -> list[StudyCompleted]:
        with self._sessions.begin() as session:
            completed = complete_quiet_studies(session, self._quiet_seconds, now)
        for event in completed:
            log.info("study complete", study_id=event.study_id, num_instances=event.num_instances)
            for listener in self._listeners:
                listener(event)
        return completed
