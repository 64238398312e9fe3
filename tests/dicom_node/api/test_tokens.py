"""API tokens: made once, kept as a hash, refused when wrong, empty or revoked; roles."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.api.tokens import (
    TOKEN_PREFIX,
    TokenError,
    TokenRole,
    allows,
    authenticate,
    create_token,
    list_tokens,
    revoke,
    token_sha256,
)
from dicom_node.security.audit import Actor, AuditAction
from tests.dicom_node.security.audit_support import audit_rows

ALICE = Actor.os_user()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "node.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def session(database: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{database}")
    with make_sessionmaker(engine)() as opened:
        yield opened
    engine.dispose()


def database_bytes(database: Path) -> bytes:
    """The database file and its write-ahead log, as the disk holds them."""
    wal = database.with_name(database.name + "-wal")
    return database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_a_token_is_random_prefixed_and_only_its_hash_is_stored(
    session: Session, database: Path
) -> None:
    token = create_token(session, "ops", TokenRole.OPERATOR, ALICE)
    other = create_token(session, "viewer", TokenRole.VIEWER, ALICE)
    session.commit()
    assert token.startswith(TOKEN_PREFIX) and len(token) >= len(TOKEN_PREFIX) + 43
    assert token != other
    stored = database_bytes(database)
    assert token_sha256(token).encode() in stored  # the search below can find what is there
    assert token.encode() not in stored
    assert token[len(TOKEN_PREFIX) :].encode() not in stored


def test_authenticate_accepts_the_token_and_records_its_use(session: Session) -> None:
    token = create_token(session, "ops", TokenRole.OPERATOR, ALICE)
    session.commit()
    assert list_tokens(session)[0].last_used_at is None
    info = authenticate(session, token)
    session.commit()
    assert info is not None
    assert (info.name, info.role, info.revoked_at) == ("ops", TokenRole.OPERATOR, None)
    assert info.last_used_at is not None
    assert list_tokens(session)[0].last_used_at == info.last_used_at


@pytest.mark.parametrize(
    "presented",
    ["", TOKEN_PREFIX, "wrong", "Bearer", f"{TOKEN_PREFIX}{'A' * 43}"],
)
def test_authenticate_refuses_an_empty_or_wrong_token(session: Session, presented: str) -> None:
    create_token(session, "ops", TokenRole.ADMIN, ALICE)
    session.commit()
    assert authenticate(session, presented) is None


def test_authenticate_refuses_the_token_with_a_changed_character(session: Session) -> None:
    token = create_token(session, "ops", TokenRole.ADMIN, ALICE)
    changed = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert authenticate(session, changed) is None
    assert authenticate(session, token) is not None


def test_a_revoked_token_is_refused_and_keeps_its_name(session: Session) -> None:
    token = create_token(session, "ops", TokenRole.ADMIN, ALICE)
    revoked = revoke(session, "ops", ALICE)
    session.commit()
    assert revoked.revoked_at is not None
    assert authenticate(session, token) is None
    with pytest.raises(TokenError, match="exists already"):
        create_token(session, "ops", TokenRole.ADMIN, ALICE)
    with pytest.raises(TokenError, match="revoked already"):
        revoke(session, "ops", ALICE)


def test_bad_names_and_unknown_tokens_are_refused(session: Session) -> None:
    create_token(session, "ops", TokenRole.VIEWER, ALICE)
    with pytest.raises(TokenError, match="exists already"):
        create_token(session, "ops", TokenRole.ADMIN, ALICE)
    for name in ("", "a b", "-ops", "x" * 65, "tok/en", "é"):
        with pytest.raises(TokenError, match="bad token name"):
            create_token(session, name, TokenRole.VIEWER, ALICE)
    with pytest.raises(TokenError, match="no token named"):
        revoke(session, "nobody", ALICE)
    assert [info.name for info in list_tokens(session)] == ["ops"]


def test_list_shows_every_token_without_secrets(session: Session) -> None:
    token = create_token(session, "b-admin", TokenRole.ADMIN, ALICE)
    create_token(session, "a-viewer", TokenRole.VIEWER, Actor.api_token("b-admin"))
    revoke(session, "b-admin", ALICE)
    session.commit()
    listed = [info.as_dict() for info in list_tokens(session)]
    assert [(row["name"], row["role"]) for row in listed] == [
        ("a-viewer", "viewer"),
        ("b-admin", "admin"),
    ]
    assert listed[0]["created_by"] == "api_token:b-admin"
    assert listed[0]["revoked_at"] is None and listed[1]["revoked_at"] is not None
    text = json.dumps(listed)
    assert token not in text and token_sha256(token) not in text


def test_roles_are_ordered_viewer_operator_admin() -> None:
    order = [TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN]
    for held_rank, held in enumerate(order):
        for needed_rank, needed in enumerate(order):
            assert allows(held, needed) is (held_rank >= needed_rank), (held, needed)


def test_create_and_revoke_are_audited_without_the_token(session: Session) -> None:
    token = create_token(session, "ops", TokenRole.OPERATOR, ALICE)
    revoke(session, "ops", Actor.api_token("root-admin"))
    session.commit()
    rows = audit_rows(session, AuditAction.TOKEN_CHANGED)
    assert [
        (row["actor_kind"], row["object_kind"], row["object_id"], row["details"]) for row in rows
    ] == [
        ("os_user", "token", "ops", {"change": "created", "role": "operator"}),
        ("api_token", "token", "ops", {"change": "revoked"}),
    ]
    text = json.dumps(audit_rows(session))
    assert token not in text and token_sha256(token) not in text


def test_a_refused_change_leaves_no_audit_row(session: Session) -> None:
    create_token(session, "ops", TokenRole.OPERATOR, ALICE)
    session.commit()
    with pytest.raises(TokenError):
        create_token(session, "ops", TokenRole.ADMIN, ALICE)
    with pytest.raises(TokenError):
        revoke(session, "nobody", ALICE)
    session.commit()
    assert len(audit_rows(session, AuditAction.TOKEN_CHANGED)) == 1


def test_a_name_taken_by_another_admin_meanwhile_is_refused_cleanly(session: Session) -> None:
    def other_admin(other: Session) -> None:
        create_token(other, "ops", TokenRole.VIEWER, Actor.api_token("other"))

    engine = session.get_bind()
    assert isinstance(engine, Engine)
    with writer_gets_in_first(engine, "api_tokens", other_admin) as race:
        with pytest.raises(TokenError, match="exists already"):
            create_token(session, "ops", TokenRole.ADMIN, ALICE)
        session.commit()
    assert race.happened
    assert [(info.name, info.role) for info in list_tokens(session)] == [("ops", TokenRole.VIEWER)]
    assert [row["actor"] for row in audit_rows(session, AuditAction.TOKEN_CHANGED)] == ["other"]
