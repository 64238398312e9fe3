"""Rules and destinations in the database: copied from the file, read back validated."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import RoutingEntry, RoutingEntryKind, RoutingHistory, RoutingOrigin
from db.testing import writer_gets_in_first
from dicom_node.config import ConfigError, Settings
from dicom_node.routing_store import load_routing, sync_from_settings
from dicom_node.security.audit import AuditAction
from tests.dicom_node import test_routing
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import settings_with

sessions = test_routing.sessions  # a migrated SQLite database

CT_RULE = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}


def stored_entries(sessions: sessionmaker[Session]) -> dict[tuple[str, str], Any]:
    with sessions() as session:
        return {
            (entry.kind, entry.name): (entry.origin, entry.position, entry.definition)
            for entry in session.scalars(select(RoutingEntry))
        }


def test_routing_entries_sync_from_the_file_and_keep_admin_entries(
    sessions: sessionmaker[Session],
) -> None:
    settings = settings_with(
        {**CT_RULE, "destinations": ["pacs"]}, {"name": "b", "pipeline": ["x"]}
    )
    with sessions.begin() as session:
        sync_from_settings(session, settings)
        session.add(
            RoutingEntry(
                kind=RoutingEntryKind.RULE,
                name="admin",
                definition={"name": "admin", "pipeline": ["median"]},
                origin=RoutingOrigin.API,
                position=9,
            )
        )
    with sessions.begin() as session:
        sync_from_settings(session, settings_with({**CT_RULE, "destinations": ["pacs"]}))
    with sessions() as session:
        loaded = load_routing(session, Settings())
    assert [r.name for r in loaded.rules] == ["ct", "admin"]
    assert [d.name for d in loaded.destinations] == ["pacs"]
    assert loaded.rules[0].destinations == ("pacs",)
    with sessions.begin() as session:
        session.add(
            RoutingEntry(
                kind=RoutingEntryKind.RULE,
                name="bad",
                definition={"name": "bad"},
                origin=RoutingOrigin.API,
                position=10,
            )
        )
    with sessions() as session, pytest.raises(ConfigError, match="rule 'bad'"):
        load_routing(session, Settings())


def test_a_second_sync_updates_the_entries_in_place(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        sync_from_settings(session, settings_with(CT_RULE, {"name": "b", "pipeline": ["x"]}))
    changed = {**CT_RULE, "pipeline": ["median"]}
    with sessions.begin() as session:
        sync_from_settings(session, settings_with({"name": "b", "pipeline": ["x"]}, changed))
    entries = stored_entries(sessions)
    assert entries[(RoutingEntryKind.RULE, "ct")] == (
        RoutingOrigin.CONFIG,
        1,
        {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["median"]},
    )
    assert entries[(RoutingEntryKind.RULE, "b")][1] == 0


def test_nodes_starting_together_both_sync_without_a_conflict(
    sessions: sessionmaker[Session],
) -> None:
    """Another node copies the same file into the table between this node's look-up and
    its insert."""
    settings = settings_with(CT_RULE)
    engine = sessions.kw["bind"]

    def other_node(other: Session) -> None:
        sync_from_settings(other, settings)

    racing = writer_gets_in_first(engine, "routing_entries", other_node)
    with racing as race, sessions.begin() as session:
        sync_from_settings(session, settings)
    assert race.happened
    assert set(stored_entries(sessions)) == {
        (RoutingEntryKind.DESTINATION, "pacs"),
        (RoutingEntryKind.RULE, "ct"),
    }
    with sessions() as session:
        assert [rule.name for rule in load_routing(session, Settings()).rules] == ["ct"]


def test_entries_added_changed_and_removed_by_the_file_are_audited(
    sessions: sessionmaker[Session],
) -> None:
    b_rule = {"name": "b", "pipeline": ["x"]}
    for rules in (
        (CT_RULE, b_rule),
        (b_rule, {**CT_RULE, "pipeline": ["median"]}),
        (b_rule,),
        (b_rule,),  # nothing changed: nothing recorded
    ):
        with sessions.begin() as session:
            sync_from_settings(session, settings_with(*rules))
    changes = audit_rows(sessions, AuditAction.RULE_CHANGED, AuditAction.DESTINATION_CHANGED)
    assert [(row["object_kind"], row["object_id"], row["details"]) for row in changes] == [
        ("destination", "pacs", {"change": "added", "version": 1, "origin": "config"}),
        ("rule", "b", {"change": "added", "version": 1, "origin": "config"}),
        ("rule", "ct", {"change": "added", "version": 1, "origin": "config"}),
        ("rule", "ct", {"change": "changed", "version": 2, "origin": "config"}),
        ("rule", "ct", {"change": "removed", "version": 3, "origin": "config"}),
    ]
    assert {(row["actor_kind"], row["actor"]) for row in changes} == {
        ("node", "configuration file")
    }
    with sessions() as session:
        versions = session.scalars(
            select(RoutingHistory).where(RoutingHistory.name == "ct").order_by(RoutingHistory.id)
        ).all()
    assert [(v.version, v.change, v.origin, v.actor) for v in versions] == [
        (1, "added", RoutingOrigin.CONFIG, "node:configuration file"),
        (2, "changed", RoutingOrigin.CONFIG, "node:configuration file"),
        (3, "removed", RoutingOrigin.CONFIG, "node:configuration file"),
    ]
    assert versions[1].definition == {**CT_RULE, "pipeline": ["median"]}
    assert versions[2].definition is None
