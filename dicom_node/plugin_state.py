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

from db.models import PluginState
from db.upsert import insert_for
from dicom_node.security import audit
from processors.registry import PluginChoice, PluginInfo, apply_states, discover


def load_states(session: Session) -> dict[str, PluginChoice]:
    """Every recorded choice, by plugin name."""
    return {
        row.name: PluginChoice(enabled=row.enabled, pinned_version=row.pinned_version)
        for row in session.scalars(select(PluginState))
    }


def list_plugins(session: Session, *, autoload: bool | None = None) -> list[PluginInfo]:
    """The discovered plugins with the admin's choices folded in."""
    return apply_states(discover(autoload=autoload), load_states(session))


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
