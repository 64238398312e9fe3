"""The audit trail: who did what to which object, and how it ended.

``record`` adds one ``audit_events`` row to the caller's session, so the row commits or
rolls back with the change it records: there is no audit row for a change that did not
happen, and no change without its row. Each stage calls it in its own transaction:

- the indexer: associations accepted or refused, and instances stored (one row per
  association and series in each indexed batch, with the count: see ``docs/security.md``);
- the assembler: a study completed;
- the job state machine: a job ran, with its outcome;
- the export queue: an output sent to a destination (or an attempt that failed);
- the routing store: rules and destinations added, changed or removed;
- the plugin state: a plugin enabled, disabled, pinned or unpinned;
- the command line: a command that shows patient data (``phi_read``) or the trail itself.

Rows hold UIDs, AE titles, addresses, names of rules, plugins and destinations, counts and
reasons: never a patient's name, ID or birth date (a test sends files with known ones
through the node and searches every row).
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import (
    AuditAction,
    AuditActorKind,
    AuditEvent,
    AuditObjectKind,
    AuditOutcome,
    as_utc,
    in_utc,
)

__all__ = [
    "Actor",
    "AuditAction",
    "AuditActorKind",
    "AuditEvent",
    "AuditObjectKind",
    "AuditOutcome",
    "AuditQuery",
    "event_as_dict",
    "read_events",
    "record",
]

REASON_LIMIT = 1000
NAME_LIMIT = 128


@dataclass(frozen=True)
class Actor:
    """Who acted: a stage of the node, a DICOM peer, an API token, or an OS user."""

    kind: AuditActorKind
    name: str
    address: str | None = None

    @classmethod
    def node(cls, stage: str) -> Actor:
        return cls(AuditActorKind.NODE, stage)

    @classmethod
    def dicom_peer(cls, calling_ae_title: str, address: str, port: int) -> Actor:
        return cls(AuditActorKind.DICOM_PEER, calling_ae_title, f"{address}:{port}")

    @classmethod
    def api_token(cls, token_name: str) -> Actor:
        return cls(AuditActorKind.API_TOKEN, token_name)

    @classmethod
    def os_user(cls) -> Actor:
        """The user running this process (the command line's user)."""
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
            name = f"uid {os.getuid()}"
        return cls(AuditActorKind.OS_USER, name)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def record(
    session: Session,
    *,
    action: AuditAction,
    actor: Actor,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    reason: str | None = None,
    object_kind: AuditObjectKind | None = None,
    object_id: str | int | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    count: int | None = None,
    details: dict[str, str | int | float | bool | None] | None = None,
    at: dt.datetime | None = None,
) -> AuditEvent:
    """Add an audit row to ``session``: it is written with the caller's transaction.

    ``details`` holds flat values (settings changed, byte counts...), never patient data.
    """
    event = AuditEvent(
        at=at or utcnow(),
        actor_kind=actor.kind,
        actor=actor.name[:NAME_LIMIT],
        actor_address=actor.address,
        action=action,
        outcome=outcome,
        reason=reason[:REASON_LIMIT] if reason else None,
        object_kind=object_kind,
        object_id=None if object_id is None else str(object_id)[:NAME_LIMIT],
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        count=count,
        details=dict(details) if details else None,
    )
    session.add(event)
    return event


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditQuery:
    """Which rows to read: newer than ``since``, of one study, of some actions; the latest
    ``limit`` of them (oldest first)."""

    since: dt.datetime | None = None
    study_instance_uid: str | None = None
    actions: Collection[AuditAction] = ()
    limit: int = 100


def read_events(session: Session, query: AuditQuery) -> list[AuditEvent]:
    statement = select(AuditEvent)
    if query.since is not None:
        statement = statement.where(AuditEvent.at >= in_utc(query.since))
    if query.study_instance_uid is not None:
        statement = statement.where(AuditEvent.study_instance_uid == query.study_instance_uid)
    if query.actions:
        statement = statement.where(AuditEvent.action.in_(sorted(query.actions)))
    latest = session.scalars(
        statement.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(query.limit)
    ).all()
    return list(reversed(latest))


def event_as_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": as_utc(event.at).isoformat(),
        "actor_kind": str(event.actor_kind),
        "actor": event.actor,
        "actor_address": event.actor_address,
        "action": str(event.action),
        "outcome": str(event.outcome),
        "reason": event.reason,
        "object_kind": None if event.object_kind is None else str(event.object_kind),
        "object_id": event.object_id,
        "study_instance_uid": event.study_instance_uid,
        "series_instance_uid": event.series_instance_uid,
        "sop_instance_uid": event.sop_instance_uid,
        "count": event.count,
        "details": event.details,
    }
