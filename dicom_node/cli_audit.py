"""``dicom-node audit``: read the audit trail (who did what to which object, and how it ended).

Reading it is itself recorded (``audit_read``, by the OS user), as is every command that
shows what the node holds about patients (``phi_read``: ``record_phi_read``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Annotated

import typer

from db.enums import AuditAction
from dicom_node.cli_base import (
    ConfigOption,
    add_row,
    database_session,
    new_table,
    print_table,
    printed_as_json_or_empty,
    settings_from,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from dicom_node.config import Settings
    from dicom_node.security.audit_syslog import AuditForwarder

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``dicom_node.queries.since.parse_since``, its refusal a ``typer.BadParameter``."""
    from dicom_node.queries.since import BadMomentError
    from dicom_node.queries.since import parse_since as parse

    try:
        return parse(value, now)
    except BadMomentError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None


def _study_uid(value: str | None) -> str | None:
    if value is not None and (len(value) > 64 or not UID_PATTERN.match(value)):
        raise typer.BadParameter(f"not a DICOM UID: {value!r}")
    return value


def record_phi_read(session: Session, command: str, count: int) -> None:
    """Record that ``command`` showed ``count`` rows of what the node holds about patients."""
    from dicom_node.security import audit

    audit.record(
        session,
        action=audit.AuditAction.PHI_READ,
        actor=audit.Actor.os_user(),
        object_kind=audit.AuditObjectKind.COMMAND,
        object_id=command,
        count=count,
    )


def start_audit_forwarding(
    settings: Settings, sessions: sessionmaker[Session] | None
) -> AuditForwarder | None:
    """Send the audit rows to ``audit_syslog_address`` while the node runs (None: not set)."""
    if settings.audit_syslog_address is None or sessions is None:
        return None
    from dicom_node.security.audit_syslog import start_forwarding

    return start_forwarding(
        sessions,
        settings.audit_syslog_address,
        settings.audit_syslog_queue_size,
        settings.effective_node_name,
    )


def audit_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of objects.")] = False,
    since: Annotated[
        str | None, typer.Option(help="Only events since: 30m, 1h, 7d, or an ISO 8601 time.")
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(help="Only events of this Study Instance UID.", callback=_study_uid),
    ] = None,
    action: Annotated[
        list[AuditAction] | None, typer.Option(help="Only this action; repeatable.")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="The latest N events (shown oldest first).", min=1, max=100_000)
    ] = 100,
    config: ConfigOption = None,
) -> None:
    """The audit trail: associations, instances stored, studies completed, jobs, exports,
    changes of rules, destinations and plugins, and who read patient data."""
    from dicom_node.security import audit

    query = audit.AuditQuery(
        since=parse_since(since) if since is not None else None,
        study_instance_uid=study,
        actions=tuple(action or ()),
        limit=limit,
    )
    with database_session(settings_from(config)) as session:
        rows = [audit.event_as_dict(event) for event in audit.read_events(session, query)]
        audit.record(
            session,
            action=audit.AuditAction.AUDIT_READ,
            actor=audit.Actor.os_user(),
            object_kind=audit.AuditObjectKind.COMMAND,
            object_id="audit",
            count=len(rows),
        )
    if printed_as_json_or_empty(rows, as_json, "no audit events"):
        return
    table = new_table(
        "AT (UTC)", "ACTOR", "ACTION", "OUTCOME", "OBJECT", "STUDY", "COUNT", numeric=("COUNT",)
    )
    for row in rows:
        actor = row["actor"] + (f" ({row['actor_address']})" if row["actor_address"] else "")
        target = " ".join(str(part) for part in (row["object_kind"], row["object_id"]) if part)
        outcome = row["outcome"] + (f": {row['reason']}" if row["reason"] else "")
        add_row(
            table,
            row["at"][:19],
            actor,
            row["action"],
            outcome,
            target or "-",
            row["study_instance_uid"] or "-",
            "" if row["count"] is None else row["count"],
        )
    print_table(table)
