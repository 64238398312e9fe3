"""The admin's plugin choices in the database (``plugin_state``), folded into discovery."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.plugin_state import list_plugins, load_states, set_state
from dicom_node.security.audit import Actor, AuditAction
from processors.registry import PluginChoice, PluginInfo, find
from tests.dicom_node.security.audit_support import audit_rows


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as opened:
        yield opened
    engine.dispose()


def plugins(session: Session) -> dict[str, PluginInfo]:
    infos = list_plugins(session, autoload=False)
    return {name: find(name, infos) for name in {info.name for info in infos}}


def test_choices_persist_and_fold_into_discovery(session: Session) -> None:
    installed = plugins(session)["mean"].version
    set_state(session, "median", enabled=False)
    set_state(session, "mean", pinned_version=installed)
    session.commit()
    assert load_states(session) == {
        "median": PluginChoice(enabled=False, pinned_version=None),
        "mean": PluginChoice(enabled=True, pinned_version=installed),
    }
    infos = plugins(session)
    assert not infos["median"].enabled and infos["median"].available
    assert infos["mean"].pinned_version == installed and infos["mean"].available
    assert infos["gaussian"].enabled and infos["gaussian"].pinned_version is None  # no row

    set_state(session, "mean", pinned_version="0.0.1")
    set_state(session, "median", enabled=True)
    session.commit()
    infos = plugins(session)
    assert not infos["mean"].available
    assert "pinned to version 0.0.1" in infos["mean"].reason
    assert infos["median"].enabled

    set_state(session, "mean", unpin=True)
    session.commit()
    infos = plugins(session)
    assert infos["mean"].available and infos["mean"].pinned_version is None


def test_two_admins_setting_a_new_plugins_state_at_once(session: Session) -> None:
    """The other one's row lands between this one's look-up and its insert."""

    def other_admin(other: Session) -> None:
        set_state(other, "median", pinned_version="9.9")

    engine = session.get_bind()
    assert isinstance(engine, Engine)
    with writer_gets_in_first(engine, "plugin_state", other_admin) as race:
        set_state(session, "median", enabled=False)
        session.commit()
    assert race.happened
    assert load_states(session) == {"median": PluginChoice(enabled=False, pinned_version="9.9")}


def test_each_change_is_audited_with_who_made_it(session: Session) -> None:
    set_state(session, "median", enabled=False)
    set_state(session, "mean", pinned_version="1.0", actor=Actor.api_token("ops"))
    set_state(session, "mean", unpin=True)
    rows = audit_rows(session, AuditAction.PLUGIN_CHANGED)
    assert [(row["object_id"], row["details"]) for row in rows] == [
        ("median", {"enabled": False}),
        ("mean", {"pinned_version": "1.0"}),
        ("mean", {"pinned_version": None}),
    ]
    assert [(row["actor_kind"], row["actor"]) for row in rows] == [
        ("os_user", getpass.getuser()),
        ("api_token", "ops"),
        ("os_user", getpass.getuser()),
    ]
