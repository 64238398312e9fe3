"""The admin's choices for processor plugins, kept in the database table ``plugin_state``.

A plugin can be disabled, or pinned to a version (it is unavailable while another version
is installed); a plugin without a row is enabled and not pinned. The plugin SDK
(``processors.registry``) discovers the plugins and takes these choices as plain data
(``PluginChoice``); reading and writing them is the node's business, here.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import PluginState, RoutingEntry, RoutingEntryKind
from db.upsert import insert_for
from dicom_node.security import audit
from processors.registry import (
    PluginChoice,
    PluginInfo,
    UnknownProcessorError,
    apply_states,
    discover,
    find,
)


def load_states(session: Session) -> dict[str, PluginChoice]:
    """Every recorded choice, by plugin name."""
    return {
        row.name: PluginChoice(enabled=row.enabled, pinned_version=row.pinned_version)
        for row in session.scalars(select(PluginState))
    }


def list_plugins(session: Session, *, autoload: bool | None = None) -> list[PluginInfo]:
    """The discovered plugins with the admin's choices folded in."""
    return apply_states(discover(autoload=autoload), load_states(session))


def find_plugin(session: Session, name: str) -> PluginInfo:
    """The plugin ``name`` with the admin's choices; ``UnknownProcessorError`` naming the
    plugins there are when there is none."""
    plugins = list_plugins(session)
    try:
        return find(name, plugins)
    except UnknownProcessorError as exc:
        known = ", ".join(sorted({p.name for p in plugins})) or "none"
        raise UnknownProcessorError(f"no plugin named {name!r} (known: {known})") from exc


def rules_using(session: Session, name: str) -> list[tuple[str, bool]]:
    """(rule name, enabled) of every stored rule whose pipeline has the plugin."""
    rows = session.scalars(select(RoutingEntry).where(RoutingEntry.kind == RoutingEntryKind.RULE))
    return [
        (row.name, bool(row.definition.get("enabled", True)))
        for row in rows
        if name in row.definition.get("pipeline", ())
    ]


def plugin_document(session: Session, info: PluginInfo) -> dict[str, Any]:
    """``info`` as the API and dashboard show one plugin: its parameters' JSON schema, the
    rules that use it and, when it is not usable, what becomes of their jobs."""
    document = info.as_dict()
    document["params_schema"] = info.params_schema()
    using = rules_using(session, info.name)
    document["rules_using"] = [rule for rule, _enabled in using]
    live = [rule for rule, enabled in using if enabled]
    if live and not info.usable:
        document["warning"] = (
            f"the enabled rules {', '.join(live)} use it: their jobs fail until it is usable"
        )
    return document


def set_state(
    session: Session,
    name: str,
    *,
    enabled: bool | None = None,
    pinned_version: str | None = None,
    unpin: bool = False,
    actor: audit.Actor | None = None,
) -> PluginState:
    """Create or update the ``plugin_state`` row for ``name`` (the caller commits); two
    admins (or nodes) setting it at once do not collide. The change is audited as done by
    ``actor`` (default: the OS user running this process)."""
    changes: dict[str, Any] = {"updated_at": dt.datetime.now(dt.UTC)}
    if enabled is not None:
        changes["enabled"] = enabled
    if unpin:
        changes["pinned_version"] = None
    elif pinned_version is not None:
        changes["pinned_version"] = pinned_version
    session.execute(
        insert_for(session, PluginState)
        .values(name=name, **{"enabled": True, **changes})
        .on_conflict_do_update(index_elements=[PluginState.name.key], set_=changes)
    )
    audit.record(
        session,
        action=audit.AuditAction.PLUGIN_CHANGED,
        actor=actor or audit.Actor.os_user(),
        object_kind=audit.AuditObjectKind.PLUGIN,
        object_id=name,
        details={key: value for key, value in changes.items() if key != "updated_at"},
    )
    return session.scalars(
        select(PluginState)
        .where(PluginState.name == name)
        .execution_options(populate_existing=True)
    ).one()
