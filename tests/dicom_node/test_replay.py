"""Dead letters: the jobs and exports that failed for good since a moment are queued
again, by rule or destination, each retry audited; a dry run changes nothing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db.models import Export, ExportState, Job, JobState
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.cli import app
from dicom_node.jobs.state import create_jobs
from dicom_node.replay import replay
from dicom_node.security.audit import Actor, AuditAction
from dicom_node.storage import Spool
from tests.dicom_node import test_routing
from tests.dicom_node.export.export_support import output_and_export
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import add_series, settings_with, study_id

sessions = test_routing.sessions
spool = test_routing.spool

NOW = dt.datetime.now(dt.UTC)
RECENTLY = NOW - dt.timedelta(minutes=30)
LONG_AGO = NOW - dt.timedelta(hours=3)
SINCE = NOW - dt.timedelta(hours=2)
ALICE = Actor.os_user()


def finish(session: Session, job: Job, state: JobState, at: dt.datetime) -> None:
    session.execute(update(Job).where(Job.id == job.id).values(state=state, finished_at=at))


def export_of(
    session: Session, job: Job, destination: str, state: ExportState, at: dt.datetime
) -> int:
    """An output of ``job`` and its export to ``destination``, last attempt due at ``at``."""
    failed = state is ExportState.FAILED
    row = output_and_export(
        session,
        job,
        state,
        next_attempt_at=at,
        destination=destination,
        attempts=3 if failed else 1,
        last_error="no association" if failed else None,
    )
    return row.id


@pytest.fixture
def dead_letters(sessions: sessionmaker[Session], spool: Spool) -> dict[str, int]:
    return make_dead_letters(sessions, spool)


def make_dead_letters(sessions: sessionmaker[Session], spool: Spool) -> dict[str, int]:
    """Jobs of the rules ``ct`` and ``ct-ai`` and their exports, failed recently or long
    ago, beside ones that succeeded or were delivered."""
    add_series(spool, sessions, number=1)
    rules = [
        {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]},
        {"name": "ct-ai", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]},
    ]
    add_series(spool, sessions, number=2)
    with sessions.begin() as session:
        made = create_jobs(session, settings_with(*rules), study_id(sessions), NOW)
        ct = [job for job in made if job.rule_name == "ct"]
        ai = [job for job in made if job.rule_name == "ct-ai"]
        finish(session, ct[0], JobState.FAILED, RECENTLY)
        finish(session, ct[1], JobState.SUCCEEDED, RECENTLY)
        finish(session, ai[0], JobState.FAILED, RECENTLY)
        finish(session, ai[1], JobState.FAILED, LONG_AGO)
        return {
            "job ct failed": ct[0].id,
            "job ai failed": ai[0].id,
            "job ai failed long ago": ai[1].id,
            "export ct to pacs failed": export_of(
                session, ct[1], "pacs", ExportState.FAILED, RECENTLY
            ),
            "export ai to ai failed": export_of(session, ai[0], "ai", ExportState.FAILED, RECENTLY),
            "export ct to pacs long ago": export_of(
                session, ct[1], "pacs", ExportState.FAILED, LONG_AGO
            ),
            "export ct delivered": export_of(
                session, ct[1], "pacs", ExportState.DELIVERED, RECENTLY
            ),
        }


def states(sessions: sessionmaker[Session]) -> tuple[dict[int, str], dict[int, str]]:
    with sessions() as session:
        jobs = {job.id: str(job.state) for job in session.scalars(select(Job))}
        exports = {row.id: str(row.state) for row in session.scalars(select(Export))}
    return jobs, exports


def test_what_failed_since_is_queued_again_and_audited(
    sessions: sessionmaker[Session], dead_letters: dict[str, int]
) -> None:
    ids = dead_letters
    with sessions.begin() as session:
        report = replay(session, SINCE, actor=ALICE)
    assert report.jobs == sorted([ids["job ct failed"], ids["job ai failed"]])
    assert report.exports == sorted(
        [ids["export ct to pacs failed"], ids["export ai to ai failed"]]
    )
    jobs, exports = states(sessions)
    assert jobs[ids["job ct failed"]] == jobs[ids["job ai failed"]] == "queued"
    assert jobs[ids["job ai failed long ago"]] == "failed"
    assert exports[ids["export ct to pacs failed"]] == exports[ids["export ai to ai failed"]]
    assert exports[ids["export ai to ai failed"]] == "pending"
    assert exports[ids["export ct to pacs long ago"]] == "failed"
    assert exports[ids["export ct delivered"]] == "delivered"
    retries = audit_rows(sessions, AuditAction.RETRY_REQUESTED)
    assert len(retries) == 4 and {row["actor"] for row in retries} == {ALICE.name}


def test_by_rule_by_destination_and_both(
    sessions: sessionmaker[Session], dead_letters: dict[str, int]
) -> None:
    ids = dead_letters
    with sessions() as session:
        by_rule = replay(session, SINCE, actor=ALICE, rule="ct-ai", dry_run=True)
        by_destination = replay(session, SINCE, actor=ALICE, destination="pacs", dry_run=True)
        both = replay(session, SINCE, actor=ALICE, rule="ct", destination="ai", dry_run=True)
    assert (by_rule.jobs, by_rule.exports) == (
        [ids["job ai failed"]],
        [ids["export ai to ai failed"]],
    )
    assert (by_destination.jobs, by_destination.exports) == ([], [ids["export ct to pacs failed"]])
    assert (both.jobs, both.exports) == ([], [])


def test_a_dry_run_changes_nothing(
    sessions: sessionmaker[Session], dead_letters: dict[str, int]
) -> None:
    before = states(sessions)
    with sessions.begin() as session:
        report = replay(session, SINCE, actor=ALICE, dry_run=True)
    assert report.dry_run and len(report.jobs) == 2 and len(report.exports) == 2
    assert states(sessions) == before
    assert audit_rows(sessions, AuditAction.RETRY_REQUESTED) == []


def test_the_command_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    url = f"sqlite:///{data_dir / 'dicom-node.db'}"
    data_dir.mkdir()
    upgrade(url)
    engine = make_engine(url)
    cli_sessions = make_sessionmaker(engine)
    ids = make_dead_letters(cli_sessions, Spool(tmp_path / "spool", fsync=False))
    engine.dispose()
    runner = CliRunner()
    dry = runner.invoke(
        app, ["replay", "--since", "2h", "--dry-run", "--json", "--config", str(config)]
    )
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout) == {
        "jobs": sorted([ids["job ct failed"], ids["job ai failed"]]),
        "exports": sorted([ids["export ct to pacs failed"], ids["export ai to ai failed"]]),
        "dry_run": True,
    }
    listed = runner.invoke(app, ["exports", "--state", "failed", "--json", "--config", str(config)])
    assert len(json.loads(listed.stdout)) == 3
    done = runner.invoke(
        app, ["replay", "--since", "2h", "--destination", "ai", "--config", str(config)]
    )
    assert done.exit_code == 0 and "0 failed job(s), 1 failed export(s)" in done.output
    listed = runner.invoke(app, ["exports", "--state", "failed", "--json", "--config", str(config)])
    assert len(json.loads(listed.stdout)) == 2
    bad = runner.invoke(app, ["replay", "--since", "yesterday", "--config", str(config)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "Traceback" not in bad.output
