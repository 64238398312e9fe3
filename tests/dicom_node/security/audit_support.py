"""Helpers of the audit tests: the audit rows a database holds, as ``dicom-node audit --json``
prints them."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.security.audit import AuditAction, AuditQuery, event_as_dict, read_events


def audit_rows(
    sessions: sessionmaker[Session] | Session, *actions: AuditAction
) -> list[dict[str, Any]]:
    """Every audit row (of ``actions``, when given), oldest first."""
    query = AuditQuery(actions=actions, limit=100_000)
    if isinstance(sessions, Session):
        return [event_as_dict(event) for event in read_events(sessions, query)]
    with sessions() as session:
        return [event_as_dict(event) for event in read_events(session, query)]
