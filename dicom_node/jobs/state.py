"""Jobs: one rule's pipeline on one series, and every change of their state.

A job is made for each (series, rule) that ``dicom_node.routing`` matches when a study
completes. Its life is ``queued -> running -> succeeded | failed``; a failed or succeeded
job can be queued again (``retry``, or a study that completes again: a running one then
runs again once its run ends, ``run_again``), and a running one
goes back to ``queued`` when its node died under it (``requeue_interrupted``) or its
attempt failed with attempts left. An operator may ``cancel`` a queued or running job:
it is ``cancelled`` at once, the dispatcher running it stops its run on its next round
and records nothing of it (``hold_running``), and it runs again only when retried.
``transition`` is the only place a job's state changes: a conditional UPDATE, so two
nodes sharing a PostgreSQL database never both move a job.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import (
    Export,
    ExportState,
    Job,
    JobState,
    Output,
    Study,
    StudyEvent,
    StudyEventKind,
    as_utc,
)
from db.upsert import insert_for
from dicom_node.config import Destination, Settings
from dicom_node.routing import RouteDecision, matched, route
from dicom_node.security import audit
from processors.errors import BadInputError

log = structlog.get_logger(__name__)

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset({JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}
CANCELLABLE = frozenset({JobState.QUEUED, JobState.RUNNING})

ERROR_TEXT_LIMIT = 4000


class InvalidTransitionError(BadInputError):
    """A state change the job life cycle does not have (say, succeeded -> running)."""


class JobStateConflictError(InvalidTransitionError):
    """An operator asked for a change the job's present state does not allow (retry a
    queued job, cancel a finished one): the REST API answers 409."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def transition(
    session: Session,
    job_id: int,
    to: JobState,
    *,
    expected: JobState | Collection[JobState],
    **values: Any,
) -> bool:
    """Move job ``job_id`` from one of ``expected`` to ``to``, setting ``values`` too.

    Returns False when the job is not (any more) in an expected state: someone else moved
    it first. Raises ``InvalidTransitionError`` for a change the life cycle does not have.
    """
    sources = {expected} if isinstance(expected, JobState) else set(expected)
    for source in sources:
        if to not in TRANSITIONS[source]:
            raise InvalidTransitionError(f"a job cannot go from {source} to {to}")
    if "error" in values and values["error"] is not None:
        values["error"] = str(values["error"])[:ERROR_TEXT_LIMIT]
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(sources))
        .values(state=to, **values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if changed:
        log.info("job state", job_id=job_id, state=str(to), **_loggable(values))
        if JobState.RUNNING in sources and to in JOB_OUTCOMES:  # a cancel has its own row
            _audit_job(
                session,
                job_id,
                audit.AuditAction.JOB_RAN,
                audit.Actor.node("dispatcher"),
                JOB_OUTCOMES[to],
                values.get("error"),
                values.get("worker"),
            )
    return bool(changed)


JOB_OUTCOMES = {
    JobState.SUCCEEDED: audit.AuditOutcome.SUCCESS,
    JobState.FAILED: audit.AuditOutcome.FAILURE,
    JobState.QUEUED: audit.AuditOutcome.RETRYING,
}


def _audit_job(
    session: Session,
    job_id: int,
    action: audit.AuditAction,
    actor: audit.Actor,
    outcome: audit.AuditOutcome = audit.AuditOutcome.SUCCESS,
    reason: str | None = None,
    worker: str | None = None,
    **details: str | int | None,
) -> None:
    """The job's audit row (a run that ended, a retry or cancel asked for), in the caller's
    transaction."""
    rule, series_uid, study_uid = session.execute(
        select(Job.rule_name, Job.series_instance_uid, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.id == job_id)
    ).one()
    audit.record(
        session,
        action=action,
        actor=actor,
        outcome=outcome,
        reason=reason,
        object_kind=audit.AuditObjectKind.JOB,
        object_id=job_id,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        details={"rule": rule, "worker": worker, **details},
    )


def _loggable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in ("error", "worker", "attempts")}


# -- making jobs -----------------------------------------------------------------------------


def reply_destinations(
    destinations: Iterable[Destination], calling_ae_titles: Collection[str]
) -> list[str]:
    """The destinations that are the sender: those whose ae_title is a calling AE title."""
    return [d.name for d in destinations if d.url is None and d.ae_title in calling_ae_titles]


def job_destinations(settings: Settings, decision: RouteDecision) -> list[str]:
    names = list(decision.rule.destinations)
    if decision.rule.reply_to_sender:
        replies = reply_destinations(settings.destinations, decision.calling_ae_titles)
        if not replies:
            log.warning(
                "no destination for the sender; not replying",
                rule=decision.rule_name,
                calling_ae_titles=list(decision.calling_ae_titles),
            )
        names += [name for name in replies if name not in names]
    return names


def create_jobs(
    session: Session, settings: Settings, study_id: int, now: dt.datetime | None = None
) -> list[Job]:
    """Route the study and queue one job per matched (series, rule), in the caller's
    transaction. A series and rule that already have a job get it queued again (the study
    completed again, with more instances); a running one is marked to run again when its
    run ends, a cancelled one stays cancelled. Two nodes routing the same
    study at once make one job (``INSERT ... ON CONFLICT DO NOTHING``)."""
    now = now or utcnow()
    decisions = route(settings, session, study_id)
    for decision in decisions:
        if not decision.matched:
            log.info("series not routed", **decision.log_fields())
    jobs: list[Job] = []
    for decision in matched(decisions):
        values = {
            "study_id": decision.study_id,
            "series_instance_uid": decision.series_instance_uid,
            "pipeline": list(decision.pipeline),
            "params": {s: decision.rule.step_params(s) for s in decision.pipeline},
            "destinations": job_destinations(settings, decision),
            "priority": decision.priority,
            "max_attempts": settings.job_max_attempts,
            "not_before": decision.not_before or now,
        }
        new_id = session.scalar(
            insert_for(session, Job)
            .values(
                series_id=decision.series_id,
                rule_name=decision.rule_name,
                state=JobState.QUEUED,
                attempts=0,
                num_outputs=0,
                created_at=now,
                **values,
            )
            .on_conflict_do_nothing(index_elements=[Job.series_id.key, Job.rule_name.key])
            .returning(Job.id)
        )
        job = session.scalars(
            select(Job)
            .where(Job.series_id == decision.series_id, Job.rule_name == decision.rule_name)
            .execution_options(populate_existing=True)
        ).one()
        if job.state == JobState.RUNNING and new_id is None:
            if _request_rerun(session, job.id, values):
                log.info(
                    "study completed again while its job runs; it runs again after", job_id=job.id
                )
                jobs.append(job)
                continue
            session.refresh(job)  # its run ended meanwhile (another node)
        if new_id is not None:
            log.info("job queued", job_id=job.id, **decision.log_fields())
        elif job.state == JobState.CANCELLED:
            log.info("study completed again; its job stays cancelled", job_id=job.id)
            continue
        else:
            reset = {"attempts": 0, "error": None, "started_at": None, "finished_at": None}
            if job.state == JobState.QUEUED:
                session.execute(update(Job).where(Job.id == job.id).values(**values))
            else:
                transition(session, job.id, JobState.QUEUED, expected=job.state, **values, **reset)
            session.refresh(job)
        jobs.append(job)
    return jobs


def _request_rerun(session: Session, job_id: int, values: dict[str, Any]) -> bool:
    """Mark a running job to run again when its run ends (``run_again``), with the rule
    as routed now; False when it is no longer running."""
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(rerun_requested=True, **values)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(changed)


def run_again(
    session: Session, job_id: int, *, expected: JobState, error: str | None = None
) -> bool:
    """Queue the job again if its study completed again while it ran, in the caller's
    transaction: the run that ended saw only the instances there when it was claimed.
    A fresh attempt count, due when the routing said (the rule's quiet time); the next
    claim reads the whole series. Called when a run ends (succeeded or failed); a job
    cancelled meanwhile is left cancelled."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or not job.rerun_requested:
        return False
    return transition(
        session,
        job_id,
        JobState.QUEUED,
        expected=expected,
        rerun_requested=False,
        attempts=0,
        claimed_by=None,
        not_before=max(as_utc(job.not_before), utcnow()),
        error=error,
    )


def consume_completed_studies(session: Session, limit: int = 100) -> list[int]:
    """Claim the ``complete`` study events not yet routed; returns their study ids."""
    query = (
        select(StudyEvent)
        .where(StudyEvent.event == StudyEventKind.COMPLETE, StudyEvent.consumed_at.is_(None))
        .order_by(StudyEvent.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    studies: list[int] = []
    now = utcnow()
    for event in session.scalars(query).all():
        changed = session.execute(
            update(StudyEvent)
            .where(StudyEvent.id == event.id, StudyEvent.consumed_at.is_(None))
            .values(consumed_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if changed and event.study_id not in studies:
            studies.append(event.study_id)
    return studies


# -- running them ----------------------------------------------------------------------------


def claim_next(session: Session, node: str, now: dt.datetime | None = None) -> Job | None:
    """Take the most urgent due job (priority, then age) and mark it running for ``node``."""
    now = now or utcnow()
    query = (
        select(Job)
        .where(Job.state == JobState.QUEUED, Job.not_before <= now)
        .order_by(Job.priority.desc(), Job.not_before, Job.id)
        .limit(5)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    for job in session.scalars(query).all():
        claimed = transition(
            session,
            job.id,
            JobState.RUNNING,
            expected=JobState.QUEUED,
            attempts=job.attempts + 1,
            claimed_by=node,
            rerun_requested=False,  # this run reads every instance there now
            started_at=now,
            finished_at=None,
            error=None,
        )
        if claimed:
            session.refresh(job)
            return job
    return None


def requeue_interrupted(session: Session, node: str) -> list[int]:
    """Jobs this node left ``running`` when it died go back to ``queued``, due now.

    Jobs running on other nodes sharing the database are theirs and left alone.
    """
    ids = list(
        session.scalars(select(Job.id).where(Job.state == JobState.RUNNING, Job.claimed_by == node))
    )
    requeued = [
        job_id
        for job_id in ids
        if transition(
            session,
            job_id,
            JobState.QUEUED,
            expected=JobState.RUNNING,
            not_before=utcnow(),
            claimed_by=None,
            error="interrupted: the node stopped while the job ran; requeued at restart",
        )
    ]
    if requeued:
        log.info("interrupted jobs requeued", count=len(requeued))
    return requeued


def retry(
    session: Session, job_id: int, *, force: bool = False, actor: audit.Actor | None = None
) -> Job | None:
    """Queue a failed, succeeded or cancelled job again, due now, with a fresh attempt
    count; ``JobStateConflictError`` for a queued one.

    ``force`` also takes a ``running`` job back: for one whose node is gone for good (a
    node that restarts under the same ``node_name`` recovers its jobs itself). If the
    node is in fact alive, its dispatcher stops that run on its next round
    (``Dispatcher.stop_cancelled``); a run that ends first records nothing either.
    Audited as asked by ``actor`` (default: the OS user running this process).
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    state = job.state
    if state is JobState.QUEUED or (state is JobState.RUNNING and not force):
        hint = " (--force takes a job whose node is gone)" if state is JobState.RUNNING else ""
        raise JobStateConflictError(f"job {job_id} is {state}; nothing to retry{hint}")
    transition(
        session,
        job_id,
        JobState.QUEUED,
        expected=state,
        not_before=utcnow(),
        attempts=0,
        error=None,
        claimed_by=None,
    )
    _audit_job(
        session,
        job_id,
        audit.AuditAction.RETRY_REQUESTED,
        actor or audit.Actor.os_user(),
        was=str(state),
    )
    session.refresh(job)
    return job


def cancel(session: Session, job_id: int, *, actor: audit.Actor) -> Job | None:
    """Cancel a queued or running job, in the caller's transaction; ``None`` if there is
    no such job, ``JobStateConflictError`` if it has finished (or was cancelled already).

    A running job's dispatcher, on whichever node shares the database, stops the run on
    its next round (``Dispatcher.stop_cancelled``) and records none of its outputs; the
    outputs its finished steps already queued for export and not yet sent are cancelled
    here, so nothing of a cancelled job leaves the node after the cancel.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    was = job.state
    cancelled = transition(
        session,
        job_id,
        JobState.CANCELLED,
        expected=CANCELLABLE,
        finished_at=utcnow(),
        error=f"cancelled by {actor.kind} {actor.name}",
    )
    session.refresh(job)
    if not cancelled:
        raise JobStateConflictError(
            f"job {job_id} is {job.state}; only a queued or running job can be cancelled"
        )
    exports = session.execute(
        update(Export)
        .where(
            Export.output_id.in_(select(Output.id).where(Output.job_id == job_id)),
            Export.state == ExportState.PENDING,
        )
        .values(state=ExportState.CANCELLED, last_error="its job was cancelled")
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    _audit_job(
        session,
        job_id,
        audit.AuditAction.CANCEL_REQUESTED,
        actor,
        was=str(was),
        exports_cancelled=int(exports),
    )
    return job


def hold_running(session: Session, job_id: int) -> bool:
    """Whether the job is still running, holding its row for the rest of the caller's
    transaction (a no-op UPDATE): a ``cancel`` on this or another node waits for that
    transaction, then finds the job finished. The dispatcher calls it before it records
    a job's outputs, so a cancelled job records and exports none."""
    held = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(state=JobState.RUNNING)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return bool(held)


def timings_document(timings: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    return [{"step": step, "seconds": round(seconds, 4)} for step, seconds in timings]


def _isoformat(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()  # SQLite: naive


def job_as_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "study_id": job.study_id,
        "series_instance_uid": job.series_instance_uid,
        "rule": job.rule_name,
        "pipeline": job.pipeline,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "error": job.error,
        "worker": job.worker,
        "claimed_by": job.claimed_by,
        "rerun_requested": job.rerun_requested,
        "outputs": job.num_outputs,
        "destinations": job.destinations,
        "step_timings": job.step_timings or [],
        "created_at": _isoformat(job.created_at),
        "started_at": _isoformat(job.started_at),
        "finished_at": _isoformat(job.finished_at),
    }
