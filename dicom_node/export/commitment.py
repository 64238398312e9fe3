"""Storage commitment after export (PS3.4 Annex J): ``delivered`` -> ``committed``.

For a destination with ``storage_commitment``, each round of the exporter
(``request_due``) asks the PACS, with an N-ACTION, to commit the exports it delivered:
one transaction per destination and round, its UID on every export it names
(``commitment_uid``, ``commitment_requested_at``, ``commitment_requests``). The PACS
answers with an N-EVENT-REPORT that a receiver checks and passes to the indexer, which
calls ``apply_report`` in its transaction:

- an instance it committed: ``committed`` (``committed_at``);
- an instance it reports failed (missing, a class conflict, ...): the delivery attempt
  counts as a failed one; the export goes back to ``pending`` to be sent again (the next
  attempt, then asked again), or to ``failed`` when that was its last attempt.

A transaction not answered within the destination's ``commitment_timeout`` is asked again,
under a new UID; after ``commitment_requests`` unanswered requests the export is
``failed`` with the reason (``dicom-node replay`` sends it again). Every result is an audit
row (``storage_commitment``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState
from dicom_node.ae.commitment import (
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    PendingTransactions,
    action_information,
    describe_failure,
)
from dicom_node.config import ConfigError
from dicom_node.dimse_status import DimseStatus, describe
from dicom_node.export.queue import _audit_exports, utcnow
from dicom_node.export.target import ExportTarget
from dicom_node.records import CommitmentReported
from dicom_node.scu import AssociationFailedError, _associate, _client_ae
from dicom_node.security import audit

log = structlog.get_logger(__name__)

MAX_INSTANCES_PER_TRANSACTION = 500
"""One N-ACTION names at most this many instances (a PACS answers a big one slowly)."""

Ask = Callable[[ExportTarget, Dataset], str | None]
"""Sends one N-ACTION: ``None`` when the PACS accepted the request, else why not."""


@dataclass
class CommitmentRound:
    """What one ``request_due`` call did: the transactions asked (UID -> export ids), the
    exports given up on, and the requests that failed (UID -> reason)."""

    asked: dict[str, list[int]] = field(default_factory=dict)
    given_up: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def send_n_action(target: ExportTarget, dataset: Dataset) -> str | None:
    """Ask ``target`` to commit what ``dataset`` names (N-ACTION, Action Type 1) over an
    association of its own; ``None`` on success, else the reason."""
    try:
        tls = target.tls.context() if target.tls is not None else None
    except ConfigError as exc:
        return str(exc)
    ae = _client_ae(target.calling_ae_title, target.timeout)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    try:
        assoc = _associate(ae, target.host, target.port, target.ae_title, tls)
    except AssociationFailedError as exc:
        return str(exc)
    try:
        status, _reply = assoc.send_n_action(
            dataset,
            REQUEST_COMMITMENT,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_INSTANCE,
        )
    except Exception as exc:  # a broken peer must not end the exporter
        return f"{type(exc).__name__}: {exc}"
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return "no N-ACTION response (timeout, abort, or storage commitment not accepted)"
    if int(status.Status) != DimseStatus.SUCCESS:
        return f"N-ACTION refused: status {describe(int(status.Status))}"
    return None


def _due(target: ExportTarget, now: dt.datetime) -> ColumnElement[bool]:
    """Delivered exports of ``target`` never asked about, or asked too long ago."""
    cutoff = now - dt.timedelta(seconds=target.commitment_timeout)
    return and_(
        Export.destination == target.name,
        Export.state == ExportState.DELIVERED,
        or_(Export.commitment_uid.is_(None), Export.commitment_requested_at <= cutoff),
    )


def _give_up(session: Session, target: ExportTarget, now: dt.datetime) -> list[int]:
    """Exports whose last allowed request went unanswered: ``failed``, with the reason."""
    asked_enough = Export.commitment_requests >= target.commitment_requests
    ids = list(
        session.scalars(
            select(Export.id)
            .where(_due(target, now), Export.commitment_uid.is_not(None))
            .where(asked_enough)
        )
    )
    if not ids:
        return []
    reason = (
        f"storage commitment never answered: asked {target.commitment_requests} times,"
        f" {target.commitment_timeout:g} s each"
    )
    session.execute(
        update(Export)
        .where(Export.id.in_(ids), _due(target, now), asked_enough)
        .values(state=ExportState.FAILED, last_error=reason)
        .execution_options(synchronize_session=False)
    )
    log.warning("storage commitment never answered", destination=target.name, exports=len(ids))
    _audit_exports(
        session,
        dict.fromkeys(ids, audit.AuditOutcome.FAILURE),
        dict.fromkeys(ids, reason),
        action=audit.AuditAction.STORAGE_COMMITMENT,
        actor=audit.Actor.node("exporter"),
        details={"destination": target.name},
    )
    return ids


def _take_due(
    sessions: sessionmaker[Session], target: ExportTarget, now: dt.datetime, limit: int
) -> tuple[str, list[Export], list[int]]:
    """Give up on what was asked enough; put a new transaction UID on up to ``limit`` due
    exports. Another node taking the same rows at the same moment wins them whole."""
    transaction_uid = generate_uid()
    with sessions() as session, session.begin():
        given_up = _give_up(session, target, now)
        query = select(Export.id).where(_due(target, now)).order_by(Export.id).limit(limit)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        ids = list(session.scalars(query))
        if ids:
            session.execute(
                update(Export)
                .where(Export.id.in_(ids), _due(target, now))
                .values(
                    commitment_uid=transaction_uid,
                    commitment_requested_at=now,
                    commitment_requests=Export.commitment_requests + 1,
                )
                .execution_options(synchronize_session=False)
            )
        rows = list(session.scalars(select(Export).where(Export.commitment_uid == transaction_uid)))
        session.expunge_all()
    return transaction_uid, rows, given_up


def request_due(
    sessions: sessionmaker[Session],
    targets: Iterable[ExportTarget],
    pending: PendingTransactions,
    *,
    now: dt.datetime | None = None,
    limit: int = MAX_INSTANCES_PER_TRANSACTION,
    ask: Ask = send_n_action,
) -> CommitmentRound:
    """Ask each storage commitment destination to commit its delivered exports that are
    due (never asked, or not answered in time); give up on those asked enough."""
    now = now or utcnow()
    result = CommitmentRound()
    for target in targets:
        if not target.storage_commitment:
            continue
        transaction_uid, rows, given_up = _take_due(sessions, target, now, limit)
        result.given_up += given_up
        if not rows:
            continue
        pending.add(transaction_uid)  # before asking: the report may come at once
        dataset = action_information(
            transaction_uid, ((row.sop_class_uid, row.sop_instance_uid) for row in rows)
        )
        error = ask(target, dataset)
        result.asked[transaction_uid] = [row.id for row in rows]
        log.info(
            "storage commitment requested",
            destination=target.name,
            transaction_uid=transaction_uid,
            instances=len(rows),
            error=error,
        )
        if error is not None:  # asked again after the timeout, like an unanswered request
            result.errors[transaction_uid] = error
            with sessions() as session, session.begin():
                session.execute(
                    update(Export)
                    .where(Export.commitment_uid == transaction_uid)
                    .values(last_error=f"storage commitment request failed: {error}"[:2000])
                )
    forget_answered(sessions, pending)
    return result


def forget_answered(sessions: sessionmaker[Session], pending: PendingTransactions) -> int:
    """Remove the markers of transactions no delivered export waits on any more (answered,
    or asked again under another UID); a report for one of them is then refused."""
    listed = pending.listed()
    if not listed:
        return 0
    with sessions() as session:
        waiting = set(
            session.scalars(
                select(Export.commitment_uid).where(
                    Export.commitment_uid.in_(listed), Export.state == ExportState.DELIVERED
                )
            )
        )
    answered = [uid for uid in listed if uid not in waiting]
    for uid in answered:
        pending.remove(uid)
    return len(answered)


def apply_report(session: Session, report: CommitmentReported) -> dict[int, ExportState]:
    """What the PACS said of a transaction, in the caller's transaction: committed exports
    become ``committed``; failed ones are sent again (``pending``, the attempt counted) or
    ``failed`` after their last attempt. Exports of the transaction the report does not
    name keep waiting (asked again after the timeout). Returns the new states by id."""
    rows = {
        row.sop_instance_uid: row
        for row in session.scalars(
            select(Export).where(
                Export.commitment_uid == report.transaction_uid,
                Export.state == ExportState.DELIVERED,
            )
        )
    }
    if not rows:
        log.warning(
            "storage commitment report for no waiting export",
            transaction_uid=report.transaction_uid,
        )
        return {}
    destinations = sorted({row.destination for row in rows.values()})
    states: dict[int, ExportState] = {}
    outcomes: dict[int, audit.AuditOutcome] = {}
    errors: dict[int, str] = {}
    for committed in report.committed:
        row = rows.pop(committed.sop_instance_uid, None)
        if row is None:
            continue
        row.state, row.committed_at, row.last_error = (
            ExportState.COMMITTED,
            report.received_at,
            None,
        )
        states[row.id], outcomes[row.id] = ExportState.COMMITTED, audit.AuditOutcome.SUCCESS
    for failed in report.failed:
        row = rows.pop(failed.sop_instance_uid, None)
        if row is None:
            continue
        # The delivery attempt it was is a failed one after all: the next send is the next
        # attempt, unless that was the last.
        error = f"not committed by the PACS: {describe_failure(failed.failure_reason)}"
        row.last_error = errors[row.id] = error
        row.commitment_uid, row.commitment_requests = None, 0
        if row.attempts >= row.max_attempts:
            row.state, outcomes[row.id] = ExportState.FAILED, audit.AuditOutcome.FAILURE
        else:
            row.state, outcomes[row.id] = ExportState.PENDING, audit.AuditOutcome.RETRYING
            row.next_attempt_at = report.received_at
        states[row.id] = row.state
    session.flush()
    _audit_exports(
        session,
        outcomes,
        errors,
        action=audit.AuditAction.STORAGE_COMMITMENT,
        actor=audit.Actor.node("exporter"),
        details={
            "destination": ", ".join(destinations),
            "transaction_uid": report.transaction_uid,
            "reported_by": report.calling_ae_title,
        },
    )
    log.info(
        "storage commitment result",
        transaction_uid=report.transaction_uid,
        committed=sum(1 for s in states.values() if s is ExportState.COMMITTED),
        resent=sum(1 for s in states.values() if s is ExportState.PENDING),
        failed=sum(1 for s in states.values() if s is ExportState.FAILED),
    )
    return states
