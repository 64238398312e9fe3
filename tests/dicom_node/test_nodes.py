"""Nodes on one database: heartbeats, a node silent past its lease has its running jobs
and exports being sent taken over (the attempt counted), by one live node only."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db.models import Export, ExportState, Job, JobState
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.cli import app
from dicom_node.jobs.state import create_jobs
from dicom_node.node import Node
from dicom_node.nodes import Heartbeat, beat, list_nodes, take_over_silent_nodes
from dicom_node.storage import Spool
from dicom_node.testing import local_settings
from tests.dicom_node import test_routing
from tests.dicom_node.test_replay import export_of
from tests.dicom_node.test_routing import add_series, settings_with, study_id

sessions = test_routing.sessions
spool = test_routing.spool

NOW = dt.datetime.now(dt.UTC)
LEASE = dt.timedelta(seconds=30)
CT_RULE = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}


def running_on(session: Session, job: Job, node: str, attempts: int) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(state=JobState.RUNNING, claimed_by=node, attempts=attempts, max_attempts=3)
    )


def claimed_by_gone(session: Session, export_id: int, attempts: int) -> None:
    session.execute(
        update(Export).where(Export.id == export_id).values(claimed_by="gone", attempts=attempts)
    )


def test_a_silent_nodes_work_is_taken_over_with_the_attempt_counted(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    add_series(spool, sessions, number=2)
    with sessions.begin() as session:
        first, second = create_jobs(session, settings_with(CT_RULE), study_id(sessions), NOW)
        beat(session, "alive", NOW, NOW)
        beat(session, "gone", NOW - LEASE * 3, NOW - LEASE * 2)
        running_on(session, first, "gone", attempts=1)  # of 3: queued again
        running_on(session, second, "gone", attempts=3)  # its last: failed
        sending = export_of(session, first, "pacs", ExportState.SENDING, NOW)
        session.execute(
            update(Export).where(Export.id == sending).values(claimed_by="gone", attempts=1)
        )
        last_try = export_of(session, second, "pacs", ExportState.SENDING, NOW)
        session.execute(
            update(Export).where(Export.id == last_try).values(claimed_by="gone", attempts=2)
        )
    with sessions.begin() as session:
        [taken] = take_over_silent_nodes(session, "alive", LEASE, NOW)
        assert take_over_silent_nodes(session, "other", LEASE, NOW) == []  # nothing left
    assert (taken.jobs_requeued, taken.jobs_failed) == ([first.id], [second.id])
    assert (taken.exports_pending, taken.exports_failed) == ([sending], [last_try])
    with sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        exports = {row.id: row for row in session.scalars(select(Export))}
    assert (jobs[first.id].state, jobs[first.id].attempts, jobs[first.id].claimed_by) == (
        JobState.QUEUED,
        1,
        None,
    )
    assert jobs[second.id].state == JobState.FAILED and "gone" in (jobs[second.id].error or "")
    assert (exports[sending].state, exports[sending].attempts) == (ExportState.PENDING, 2)
    assert exports[last_try].state == ExportState.FAILED


def test_a_live_node_and_a_stopped_one_keep_their_work(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    with sessions.begin() as session:
        [job] = create_jobs(session, settings_with(CT_RULE), study_id(sessions), NOW)
        beat(session, "busy", NOW, NOW - LEASE / 2)
        running_on(session, job, "busy", attempts=1)
    with sessions.begin() as session:
        assert take_over_silent_nodes(session, "alive", LEASE, NOW) == []
        listed = {row["name"]: row for row in list_nodes(session, LEASE, NOW)}
    assert listed["busy"]["state"] == "running" and listed["busy"]["running_jobs"] == 1


def test_a_running_node_takes_over_a_dead_nodes_job_by_itself(tmp_path: Path) -> None:
    settings = local_settings(
        tmp_path, node_name="alive", node_heartbeat_seconds=0.2, node_lease_seconds=1.0
    )
    node = Node(settings)
    node.start()
    try:
        assert node.sessions is not None
        spool = Spool(settings.spool_dir, fsync=False)
        add_series(spool, node.sessions, number=1)
        with node.sessions.begin() as session:
            [job] = create_jobs(session, settings_with(CT_RULE), study_id(node.sessions), NOW)
            beat(session, "dead", NOW - LEASE, NOW - LEASE)
            running_on(session, job, "dead", attempts=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with node.sessions() as session:
                state, claimed_by = session.execute(
                    select(Job.state, Job.claimed_by).where(Job.id == job.id)
                ).one()
            if claimed_by != "dead":
                break
            time.sleep(0.1)
        assert claimed_by != "dead", "the job was not taken over"
        assert state in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED)
        with node.sessions() as session:
            names = {row["name"]: row["state"] for row in list_nodes(session, LEASE, NOW)}
        assert names["alive"] == "running"
    finally:
        node.stop(grace_seconds=1)
    with make_sessionmaker(make_engine(settings.effective_database_url))() as session:
        [row] = [
            r for r in list_nodes(session, LEASE, dt.datetime.now(dt.UTC)) if r["name"] == "alive"
        ]
    assert row["state"] == "stopped"


def test_nodes_command(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data_dir}"\nnode_lease_seconds = 30\n')
    url = f"sqlite:///{data_dir / 'dicom-node.db'}"
    upgrade(url)
    cli_sessions = make_sessionmaker(make_engine(url))
    runner = CliRunner()
    empty = runner.invoke(app, ["nodes", "--config", str(config)])
    assert empty.exit_code == 0 and "no node" in empty.output
    beater = Heartbeat(cli_sessions, "one", interval=60, lease=30)
    beater.once()
    with cli_sessions.begin() as session:
        beat(session, "two", NOW - LEASE * 4, NOW - LEASE * 2)
    listed = runner.invoke(app, ["nodes", "--json", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    states = {row["name"]: row["state"] for row in json.loads(listed.stdout)}
    assert states == {"one": "running", "two": "silent"}
    beater.stop()
    listed = runner.invoke(app, ["nodes", "--json", "--config", str(config)])
    assert {row["name"]: row["state"] for row in json.loads(listed.stdout)}["one"] == "stopped"
