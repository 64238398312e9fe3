"""``dicom-node tokens``: the token printed once and alone on stdout, never stored nor listed;
bad input as one line and exit code 2."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db.session import make_engine, make_sessionmaker
from dicom_node.api.tokens import TOKEN_PREFIX, authenticate, token_sha256
from dicom_node.cli import app
from dicom_node.security.audit import AuditAction
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_cli import assert_refused

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path))
    return tmp_path


def database_bytes(data_dir: Path) -> bytes:
    return b"".join(path.read_bytes() for path in data_dir.glob("dicom-node.db*"))


def create(name: str, role: str) -> str:
    result = runner.invoke(app, ["tokens", "create", name, "--role", role])
    assert result.exit_code == 0, result.output
    return result.stdout


def listing() -> list[dict[str, object]]:
    result = runner.invoke(app, ["tokens", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_create_prints_the_token_alone_once_and_stores_its_hash(data_dir: Path) -> None:
    result = runner.invoke(app, ["tokens", "create", "ops", "--role", "operator"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.startswith(TOKEN_PREFIX)
    assert "will not be shown again" in result.stderr and token not in result.stderr
    stored = database_bytes(data_dir)
    assert token_sha256(token).encode() in stored
    assert token.encode() not in stored
    listed = runner.invoke(app, ["tokens", "list"])
    assert listed.exit_code == 0 and "ops" in listed.stdout and "operator" in listed.stdout
    assert token not in listed.output and token_sha256(token) not in listed.output
    engine = make_engine(f"sqlite:///{data_dir / 'dicom-node.db'}")
    with make_sessionmaker(engine)() as session:
        info = authenticate(session, token)
        assert info is not None and info.name == "ops"
    engine.dispose()


def test_list_json_and_revoke(data_dir: Path) -> None:
    create("viewer-1", "viewer")
    create("admin-1", "admin")
    rows = listing()
    assert [(row["name"], row["role"], row["revoked_at"]) for row in rows] == [
        ("admin-1", "admin", None),
        ("viewer-1", "viewer", None),
    ]
    assert set(rows[0]) == {
        "name",
        "role",
        "created_at",
        "created_by",
        "last_used_at",
        "revoked_at",
    }
    assert rows[0]["created_by"] == f"os_user:{getpass.getuser()}"
    result = runner.invoke(app, ["tokens", "revoke", "viewer-1"])
    assert result.exit_code == 0 and "revoked" in result.stdout
    assert [row["revoked_at"] is not None for row in listing()] == [False, True]


def test_create_and_revoke_are_audited_as_the_os_user_without_the_token(data_dir: Path) -> None:
    token = create("ops", "admin").strip()
    assert runner.invoke(app, ["tokens", "revoke", "ops"]).exit_code == 0
    engine = make_engine(f"sqlite:///{data_dir / 'dicom-node.db'}")
    rows = audit_rows(make_sessionmaker(engine), AuditAction.TOKEN_CHANGED)
    engine.dispose()
    assert [(row["actor_kind"], row["actor"], row["object_id"]) for row in rows] == [
        ("os_user", getpass.getuser(), "ops"),
        ("os_user", getpass.getuser(), "ops"),
    ]
    assert token not in json.dumps(rows)


def test_list_says_when_there_are_none(data_dir: Path) -> None:
    result = runner.invoke(app, ["tokens", "list"])
    assert result.exit_code == 0 and "no tokens" in result.stdout
    assert listing() == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["create", "ops", "--role", "admin"], ("'ops'", "exists already")),
        (["create", "other", "--role", "root"], ("--role", "root")),
        (["create", "other"], ("--role",)),
        (["create", "a b", "--role", "viewer"], ("bad token name", "'a b'")),
        (["create", "../x", "--role", "viewer"], ("bad token name",)),
        (["revoke", "nobody"], ("no token named 'nobody'",)),
        (["revoke", "gone"], ("'gone'", "revoked already")),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    data_dir: Path, args: list[str], words: tuple[str, ...]
) -> None:
    create("ops", "viewer")
    create("gone", "viewer")
    assert runner.invoke(app, ["tokens", "revoke", "gone"]).exit_code == 0
    before = listing()
    result = runner.invoke(app, ["tokens", *args])
    assert_refused(result, 2, *words)
    assert result.stdout == ""
    assert listing() == before
