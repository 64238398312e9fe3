"""Rules and destinations in the database, so they can be edited while the node runs.

At start the node copies the configuration file's rules and destinations into
``routing_entries`` (origin ``config``; the file wins for its names, and entries the
file no longer has are removed). Entries with origin ``api`` are an administrator's and
are kept. The dispatcher reads the table (``load_routing``) rather than the file, with the
same validation as the file: an invalid entry is refused with its name.

Every version of an entry is kept in ``routing_history`` (the file's changes too), so an
administrator's change can be looked at and reverted; the administrator's changes
themselves (create, update, delete, enable, disable, revert) are in
``dicom_node.routing_admin``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db.models import RoutingEntry, RoutingEntryKind, RoutingHistory, RoutingOrigin, utcnow
from db.upsert import insert_for
from dicom_node.config import ConfigError, Destination, Rule, Settings
from dicom_node.security import audit

AUDIT_ACTIONS = {
    RoutingEntryKind.RULE: (audit.AuditAction.RULE_CHANGED, audit.AuditObjectKind.RULE),
    RoutingEntryKind.DESTINATION: (
        audit.AuditAction.DESTINATION_CHANGED,
        audit.AuditObjectKind.DESTINATION,
    ),
}


def _store(
    session: Session, kind: RoutingEntryKind, items: Sequence[BaseModel], names: list[str]
) -> None:
    """Insert or overwrite the file's entries of ``kind`` (nodes starting together on one
    database both do, without a conflict); remove those the file no longer has. Each entry
    added, changed or removed gets its audit row."""
    before = {
        name: (definition, origin)
        for name, definition, origin in session.execute(
            select(RoutingEntry.name, RoutingEntry.definition, RoutingEntry.origin).where(
                RoutingEntry.kind == kind
            )
        )
    }
    definitions = [item.model_dump(mode="json", exclude_defaults=True) for item in items]
    if names:
        upsert = insert_for(session, RoutingEntry).values(
            [
                {
                    "kind": kind,
                    "name": name,
                    "position": position,
                    "definition": definition,
                    "origin": RoutingOrigin.CONFIG,
                    "updated_at": utcnow(),
                }
                for position, (name, definition) in enumerate(zip(names, definitions, strict=True))
            ]
        )
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=[RoutingEntry.kind.key, RoutingEntry.name.key],
                set_={
                    column: upsert.excluded[column]
                    for column in ("position", "definition", "origin", "updated_at")
                },
            )
        )
    session.execute(
        delete(RoutingEntry).where(
            RoutingEntry.kind == kind,
            RoutingEntry.origin == RoutingOrigin.CONFIG,
            RoutingEntry.name.not_in(names),
        )
    )
    changes = {
        name: "added" if name not in before else "changed"
        for name, definition in zip(names, definitions, strict=True)
        if before.get(name) != (definition, RoutingOrigin.CONFIG)
    }
    changes |= {
        name: "removed"
        for name, (_definition, origin) in before.items()
        if origin == RoutingOrigin.CONFIG and name not in names
    }
    actor = audit.Actor.node("configuration file")
    stored = dict(zip(names, definitions, strict=True))
    for name, change in sorted(changes.items()):
        record_change(session, kind, name, change, stored.get(name), RoutingOrigin.CONFIG, actor)


def record_change(
    session: Session,
    kind: RoutingEntryKind,
    name: str,
    change: str,
    definition: dict[str, Any] | None,
    origin: RoutingOrigin,
    actor: audit.Actor,
    details: Mapping[str, str | int] | None = None,
) -> int:
    """Record a change of an entry: its next version in ``routing_history`` (``definition``
    None: it was deleted) and its audit row (the change, version, origin and ``details``;
    never the definition, which may match on patient attributes). Returns the version."""
    latest = session.scalar(
        select(func.max(RoutingHistory.version)).where(
            RoutingHistory.kind == kind, RoutingHistory.name == name
        )
    )
    version = (latest or 0) + 1
    session.add(
        RoutingHistory(
            kind=kind,
            name=name,
            version=version,
            change=change,
            definition=definition,
            origin=origin,
            actor=f"{actor.kind}:{actor.name}"[:160],
            changed_at=utcnow(),
        )
    )
    session.flush()
    action, object_kind = AUDIT_ACTIONS[kind]
    audit.record(
        session,
        action=action,
        actor=actor,
        object_kind=object_kind,
        object_id=name,
        details={"change": change, "version": version, "origin": str(origin), **(details or {})},
    )
    return version


def sync_from_settings(session: Session, settings: Settings) -> None:
    """Copy the configuration's destinations and rules into the table."""
    _store(
        session,
        RoutingEntryKind.DESTINATION,
        settings.destinations,
        [destination.name for destination in settings.destinations],
    )
    _store(session, RoutingEntryKind.RULE, settings.rules, [r.name for r in settings.rules])


def load_routing(session: Session, settings: Settings) -> Settings:
    """``settings`` with the table's destinations and rules, each validated as in the file.

    Raises ``ConfigError`` naming the first invalid entry.
    """
    entries = session.scalars(
        select(RoutingEntry).order_by(RoutingEntry.kind, RoutingEntry.position, RoutingEntry.name)
    ).all()
    destinations: list[Destination] = []
    rules: list[Rule] = []
    for entry in entries:
        model: type[Destination] | type[Rule] = (
            Destination if entry.kind == RoutingEntryKind.DESTINATION else Rule
        )
        try:
            item = model.model_validate(entry.definition)
        except ValidationError as exc:
            raise ConfigError(f"{entry.kind} {entry.name!r} in the database: {exc}") from exc
        if isinstance(item, Destination):
            destinations.append(item)
        else:
            rules.append(item)
    known = {destination.name for destination in destinations}
    for rule in rules:
        missing = [name for name in rule.destinations if name not in known]
        if missing:
            raise ConfigError(f"rule {rule.name!r}: destination {missing[0]!r} is not defined")
    return settings.model_copy(update={"destinations": tuple(destinations), "rules": tuple(rules)})
