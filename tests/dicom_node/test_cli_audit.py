"""``dicom-node audit``: filters, JSON and table, bad arguments as one line; reading the
trail, and listing studies, exports or jobs, are recorded themselves."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.cli import app
from dicom_node.cli_audit import parse_since
from dicom_node.security.audit import Actor, AuditAction, record
from tests.dicom_node.security.audit_support import audit_rows

runner = CliRunner()
NOW = dt.datetime.now(dt.UTC)
STUDY = "1.2.826.0.1.3680043.10.1433.9"


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The node's database (under DICOM_NODE_DATA_DIR) with three events: two hours ago,
    ten minutes ago (of STUDY), and now."""
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'dicom-node.db'}"
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        peer = Actor.dicom_peer("CT1", "10.0.0.5", 4100)
        record(
            session,
            action=AuditAction.ASSOCIATION_ACCEPTED,
            actor=peer,
            at=NOW - dt.timedelta(hours=2),
        )
        record(
            session,
            action=AuditAction.INSTANCES_STORED,
            actor=peer,
            study_instance_uid=STUDY,
            count=12,
            at=NOW - dt.timedelta(minutes=10),
        )
        record(
            session,
            action=AuditAction.PLUGIN_CHANGED,
            actor=Actor.os_user(),
            object_id="nlm",
            at=NOW,
        )
    engine.dispose()
    return url


def listed(*args: str) -> list[dict[str, object]]:
    result = runner.invoke(app, ["audit", "--json", *args])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.output)
    return rows


def test_filters_select_the_events(database: str) -> None:
    assert [row["action"] for row in listed()] == [
        "association_accepted",
        "instances_stored",
        "plugin_changed",
    ]
    assert [row["action"] for row in listed("--since", "1h")] == [
        "instances_stored",
        "plugin_changed",
        "audit_read",  # the first listing
    ]
    assert [row["count"] for row in listed("--study", STUDY)] == [12]
    both = listed("--action", "plugin_changed", "--action", "association_accepted")
    assert [row["action"] for row in both] == ["association_accepted", "plugin_changed"]
    assert [row["action"] for row in listed("--limit", "1")] == ["audit_read"]  # the reads so far


def test_since_with_an_offset_compares_the_same_moment_in_utc(database: str) -> None:
    """SQLite keeps times as text without offsets: 30 minutes ago written at +05:00 is
    still 30 minutes ago (as text it would sort five hours later)."""
    half_an_hour_ago = (NOW - dt.timedelta(minutes=30)).astimezone(
        dt.timezone(dt.timedelta(hours=5))
    )
    assert [row["action"] for row in listed("--since", half_an_hour_ago.isoformat())] == [
        "instances_stored",
        "plugin_changed",
    ]


def test_the_table_and_the_read_itself_recorded(database: str) -> None:
    result = runner.invoke(app, ["audit", "--action", "instances_stored"])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if STUDY in line]
    assert "CT1 (10.0.0.5:4100)" in line and "instances_stored" in line and line.endswith("12")
    [read] = audit_rows(make_sessionmaker(make_engine(database)), AuditAction.AUDIT_READ)
    assert (read["actor_kind"], read["actor"], read["count"]) == ("os_user", getpass.getuser(), 1)


def test_listing_studies_exports_or_jobs_records_a_phi_read(database: str) -> None:
    for command in ("studies", "exports", "jobs"):
        assert runner.invoke(app, [command, "--json"]).exit_code == 0
    reads = audit_rows(make_sessionmaker(make_engine(database)), AuditAction.PHI_READ)
    assert [(row["object_id"], row["actor"], row["count"]) for row in reads] == [
        ("studies", getpass.getuser(), 0),
        ("exports", getpass.getuser(), 0),
        ("jobs", getpass.getuser(), 0),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "expected a duration"),
        (["--action", "looked"], "'looked' is not one of"),
        (["--study", "1.2.abc"], "not a DICOM UID"),
        (["--limit", "0"], "greater than or equal to 1"),
        (["--since", "1000000d"], "reaches before the year 1"),
        (["--since", "0001-01-01T00:00+01:00"], "out of range in UTC"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_code_2(
    database: str, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["audit", *args])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_since_reads_durations_and_iso_times() -> None:
    now = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    assert parse_since("90m", now) == now - dt.timedelta(minutes=90)
    assert parse_since("2w", now) == now - dt.timedelta(weeks=2)
    assert parse_since("2026-11-29", now) == dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
    assert parse_since("2026-11-29T10:00+01:00", now) == dt.datetime(2026, 11, 29, 9, tzinfo=dt.UTC)
    assert parse_since("2026-11-29T10:00+01:00", now).utcoffset() == dt.timedelta(0)
