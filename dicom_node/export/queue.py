"""The persistent export queue: one ``exports`` row per (destination, SOP instance).

``enqueue`` adds rows (enqueueing the same instance again is the same row); ``claim``
takes the rows whose time has come (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
nodes can share the work) and marks them ``sending``; ``record`` writes what became of
each: ``delivered``, or the attempt counted with its error and the next one after an
exponential backoff (``RetryPolicy``), or ``failed`` once ``max_attempts`` are used.
``recover_interrupted`` puts rows a crash left ``sending`` back to ``pending``. An
operator may ``cancel`` a ``pending`` or ``failed`` row: a ``cancelled`` row is never
claimed, so never sent, until ``retry`` (or a job that produces it again) makes it
``pending``.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom.errors import InvalidDicomError
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Output, Series, Study
from db.upsert import insert_for
from dicom_node.export.target import ExportTarget
from dicom_node.export.transport import Outcome
from dicom_node.security import audit
from dicom_node.security.crypto import read_dicom
from dicom_node.security.keys import DecryptionError, KeyRing
from processors.errors import BadInputError

log = structlog.get_logger(__name__)


class ExportError(BadInputError):
    """A file or output cannot be enqueued (not DICOM, no SOP UIDs)."""


class ExportStateConflictError(BadInputError):
    """An operator asked for a change the export's present state does not allow (cancel a
    delivered export, retry one being sent): the REST API answers 409."""


CANCELLABLE = (ExportState.PENDING, ExportState.FAILED)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff after the n-th failed attempt: ``min(cap, base * 2**(n-1))``, jittered down
    by up to ``jitter`` of itself (so nodes that failed together do not retry together)."""

    base_seconds: float = 2.0
    cap_seconds: float = 600.0
    jitter: float = 0.5

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        exponent = min(max(attempts - 1, 0), 64)
        full = min(self.cap_seconds, self.base_seconds * 2.0**exponent)
        factor = 1.0 - self.jitter * (rng or random).random()
        return full * factor


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` call did, by export id."""

    claimed: int = 0
    delivered: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    destinations: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Claimed:
    """A row this node marked ``sending``: what sending it needs, and its attempts so far."""

    id: int
    destination: str
    path: str
    attempts: int
    max_attempts: int


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _instance_uids(path: Path, keys: KeyRing | None) -> tuple[str, str]:
    try:
        header = read_dicom(
            path,
            keys,
            stop_before_pixels=True,
            force=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
    except (InvalidDicomError, OSError, ValueError, EOFError, DecryptionError) as exc:
        raise ExportError(f"{path}: not readable as DICOM: {exc}") from exc
    sop_class, sop_instance = header.get("SOPClassUID"), header.get("SOPInstanceUID")
    if not sop_class or not sop_instance:
        raise ExportError(f"{path}: not a DICOM instance (no SOP Class/Instance UID)")
    return str(sop_class), str(sop_instance)


def enqueue(
    session: Session,
    target: ExportTarget,
    files_or_outputs: Iterable[Path | Output],
    *,
    now: dt.datetime | None = None,
    keys: KeyRing | None = None,
) -> list[Export]:
    """Add (or find) one row per instance for ``target``, due now, in the caller's transaction.
    Another node adding the same row meanwhile is not an error (``ON CONFLICT DO NOTHING``).

    A row already ``pending``, ``sending`` or ``delivered`` is left as it is (an instance
    exported twice is sent once); a ``failed`` or ``cancelled`` one (a job that ran
    again produced it anew) goes back to ``pending`` with its attempts kept, like
    ``retry``. Raises ``ExportError`` for a file that is not DICOM
    (``keys`` decrypt an encrypted one).
    """
    now = now or utcnow()
    rows: list[Export] = []
    for item in files_or_outputs:
        if isinstance(item, Output):
            sop_class, sop_instance, path, output_id = (
                item.sop_class_uid,
                item.sop_instance_uid,
                item.path,
                item.id,
            )
        else:
            sop_class, sop_instance = _instance_uids(item, keys)
            path, output_id = str(item.resolve()), None
        session.execute(
            insert_for(session, Export)
            .values(
                destination=target.name,
                host=target.host[:255],
                port=target.port,
                ae_title=target.ae_title,
                sop_instance_uid=sop_instance,
                sop_class_uid=sop_class,
                path=path,
                state=ExportState.PENDING,
                attempts=0,
                max_attempts=target.max_attempts,
                next_attempt_at=now,
                created_at=now,
                output_id=output_id,
            )
            .on_conflict_do_nothing(
                index_elements=[Export.destination.key, Export.sop_instance_uid.key]
            )
        )
        row = session.scalars(
            select(Export).where(
                Export.destination == target.name, Export.sop_instance_uid == sop_instance
            )
        ).one()
        if row.state in (ExportState.FAILED, ExportState.CANCELLED):
            row.path, row.sop_class_uid = path, sop_class
            row.output_id = output_id if output_id is not None else row.output_id
            _to_pending(row, now)
        rows.append(row)
    return rows


def _to_pending(row: Export, now: dt.datetime) -> None:
    row.state = ExportState.PENDING
    row.next_attempt_at = now
    row.last_error = None
    row.commitment_uid, row.commitment_requests = None, 0


def retry(
    session: Session,
    export_id: int,
    *,
    now: dt.datetime | None = None,
    actor: audit.Actor | None = None,
) -> Export | None:
    """Put one export back to ``pending``, due now, attempts kept (so a failed row gets one
    more attempt). ``None`` if there is no such export; a delivered one is sent again, a
    cancelled one sent after all; one being sent now is an ``ExportStateConflictError``.
    Audited as asked by ``actor`` (default: the OS user running this process)."""
    row = session.get(Export, export_id)
    if row is None:
        return None
    if row.state == ExportState.SENDING:
        raise ExportStateConflictError(f"export {export_id} is being sent now; nothing to retry")
    _to_pending(row, now or utcnow())
    _audit_exports(
        session,
        {row.id: audit.AuditOutcome.SUCCESS},
        {},
        action=audit.AuditAction.RETRY_REQUESTED,
        actor=actor or audit.Actor.os_user(),
        details={"destination": row.destination},
    )
    return row


def cancel(session: Session, export_id: int, *, actor: audit.Actor) -> Export | None:
    """Cancel a ``pending`` or ``failed`` export, in the caller's transaction: it is not
    sent (again) unless retried. ``None`` if there is no such export; an export being sent,
    delivered or cancelled already is an ``ExportStateConflictError``. The change is
    conditional, so an exporter claiming the row at the same moment wins or loses whole."""
    row = session.get(Export, export_id, populate_existing=True)
    if row is None:
        return None
    cancelled = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.state.in_(CANCELLABLE))
        .values(state=ExportState.CANCELLED)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    session.refresh(row)
    if not cancelled:
        raise ExportStateConflictError(
            f"export {export_id} is {row.state}; only a pending or failed export can be cancelled"
        )
    _audit_exports(
        session,
        {row.id: audit.AuditOutcome.SUCCESS},
        {},
        action=audit.AuditAction.CANCEL_REQUESTED,
        actor=actor,
        details={"destination": row.destination},
    )
    return row


def recover_interrupted(
    sessions: sessionmaker[Session], now: dt.datetime | None = None, node: str | None = None
) -> int:
    """Rows left ``sending`` (the node died mid-send) go back to ``pending``, due now.

    With ``node``, only the rows that node claimed (and rows nobody claimed): other nodes
    sharing the database may be sending theirs right now.
    """
    query = update(Export).where(Export.state == ExportState.SENDING)
    if node is not None:
        query = query.where(or_(Export.claimed_by == node, Export.claimed_by.is_(None)))
    with sessions() as session, session.begin():
        changed = session.execute(
            query.values(
                state=ExportState.PENDING, next_attempt_at=now or utcnow(), claimed_by=None
            )
        ).rowcount  # type: ignore[attr-defined]
    if changed:
        log.info("interrupted exports back to pending", count=changed)
    return int(changed)


def claim(
    sessions: sessionmaker[Session],
    names: Sequence[str],
    now: dt.datetime,
    limit: int,
    node: str | None,
) -> list[Claimed]:
    """Mark up to ``limit`` due ``pending`` rows of the named destinations ``sending``, oldest
    due first; rows another node claimed at the same moment are left to it."""
    with sessions() as session, session.begin():
        query = (
            select(Export)
            .where(
                Export.state == ExportState.PENDING,
                Export.next_attempt_at <= now,
                Export.destination.in_(names),
            )
            .order_by(Export.next_attempt_at, Export.id)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        claimed = []
        for row in session.scalars(query).all():
            changed = session.execute(
                update(Export)
                .where(Export.id == row.id, Export.state == ExportState.PENDING)
                .values(state=ExportState.SENDING, claimed_by=node)
            ).rowcount  # type: ignore[attr-defined]
            if changed:
                claimed.append(
                    Claimed(row.id, row.destination, row.path, row.attempts, row.max_attempts)
                )
        return claimed


def record(
    sessions: sessionmaker[Session],
    target: ExportTarget,
    batch: list[Claimed],
    outcomes: dict[int, Outcome],
    policy: RetryPolicy,
    rng: random.Random | None,
    report: DeliveryReport,
) -> None:
    """Write each claimed row's outcome (``outcomes`` by export id) and add it to ``report``."""
    finished = utcnow()
    outcome_of: dict[int, audit.AuditOutcome] = {}
    with sessions() as session, session.begin():
        for claimed in batch:
            outcome = outcomes[claimed.id]
            report.destinations[claimed.id] = target.name
            attempts = claimed.attempts + 1
            values: dict[str, object] = {
                "attempts": attempts,
                "claimed_by": None,
                "host": target.host[:255],
                "port": target.port,
                "ae_title": target.ae_title,
            }
            if outcome.delivered:
                values.update(state=ExportState.DELIVERED, delivered_at=finished, last_error=None)
                report.delivered.append(claimed.id)
            else:
                error = (outcome.error or "unknown error")[:2000]
                values["last_error"] = error
                report.errors[claimed.id] = error
                if attempts >= claimed.max_attempts:
                    values["state"] = ExportState.FAILED
                    report.failed.append(claimed.id)
                    log.warning(
                        "export failed for good",
                        export_id=claimed.id,
                        destination=target.name,
                        attempts=attempts,
                        error=error,
                    )
                else:
                    delay = policy.delay(attempts, rng)
                    values["state"] = ExportState.PENDING
                    values["next_attempt_at"] = finished + dt.timedelta(seconds=delay)
                    report.retrying.append(claimed.id)
            changed = session.execute(
                update(Export)
                .where(Export.id == claimed.id, Export.state == ExportState.SENDING)
                .values(**values)
            ).rowcount  # type: ignore[attr-defined]
            if changed:
                outcome_of[claimed.id] = EXPORT_OUTCOMES[ExportState(str(values["state"]))]
        _audit_exports(
            session,
            outcome_of,
            report.errors,
            action=(
                audit.AuditAction.OUTPUT_EXPORTED
                if target.deidentify is None
                else audit.AuditAction.DEIDENTIFIED_SENT
            ),
            actor=audit.Actor.node("exporter"),
            details={"destination": target.name, "transport": target.kind},
        )


EXPORT_OUTCOMES = {
    ExportState.DELIVERED: audit.AuditOutcome.SUCCESS,
    ExportState.PENDING: audit.AuditOutcome.RETRYING,
    ExportState.FAILED: audit.AuditOutcome.FAILURE,
}


def _audit_exports(
    session: Session,
    outcomes: dict[int, audit.AuditOutcome],
    errors: dict[int, str],
    *,
    action: audit.AuditAction,
    actor: audit.Actor,
    details: dict[str, str | int | float | bool | None],
) -> None:
    """One row per export (``outcomes`` by id), with the instance and the study of the
    output's source series; ``details`` name the destination (its address is in the routing
    table)."""
    if not outcomes:
        return
    rows = session.execute(
        select(
            Export.id,
            Export.attempts,
            Export.sop_instance_uid,
            Output.series_instance_uid,
            Study.study_instance_uid,
        )
        .outerjoin(Output, Output.id == Export.output_id)
        .outerjoin(Series, Series.series_instance_uid == Output.source_series_uid)
        .outerjoin(Study, Study.id == Series.study_id)
        .where(Export.id.in_(sorted(outcomes)))
    )
    for export_id, attempts, sop_uid, series_uid, study_uid in rows:
        audit.record(
            session,
            action=action,
            actor=actor,
            outcome=outcomes[export_id],
            reason=errors.get(export_id),
            object_kind=audit.AuditObjectKind.EXPORT,
            object_id=export_id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            details={**details, "attempt": attempts},
        )
