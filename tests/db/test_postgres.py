"""The same code on a real PostgreSQL server: migrations, indexing, assembler, two nodes."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Job, JobState, Series, Study, StudyEvent
from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.assembler import StudyAssembler
from dicom_node.index import write_batch
from dicom_node.node import Node
from dicom_node.scu import scan_files, send
from dicom_node.storage import Spool
from dicom_node.synthetic import SyntheticSeries
from dicom_node.testing import local_settings
from tests.dicom_node.test_index import record

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def postgres_url(postgres_server: str) -> str:
    upgrade(postgres_server)
    return postgres_server


@pytest.fixture
def sessions(postgres_database: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database of the test's own."""
    upgrade(postgres_database)
    engine = make_engine(postgres_database)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_migration_creates_every_table(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {
        "associations",
        "studies",
        "series",
        "instances",
        "study_events",
        "plugin_state",
        "alembic_version",
    } <= tables
    upgrade(postgres_url)  # idempotent


def test_two_nodes_share_one_database(
    postgres_url: str, tmp_path: Path, small_ct: SyntheticSeries
) -> None:
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    halves = [tmp_path / "a", tmp_path / "b"]
    for index, dataset in enumerate(small_ct.datasets):
        fresh = copy.deepcopy(dataset)
        fresh.StudyInstanceUID, fresh.SeriesInstanceUID = study_uid, series_uid
        fresh.SOPInstanceUID = fresh.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
        halves[index % 2].mkdir(exist_ok=True)
        fresh.save_as(halves[index % 2] / f"{index}.dcm", enforce_file_format=True)

    nodes = [
        Node(local_settings(tmp_path / name, database_url=postgres_url, study_quiet_seconds=1))
        for name in ("node1", "node2")
    ]
    for node in nodes:
        node.start()
    try:
        for node, half in zip(nodes, halves, strict=True):
            files, _ = scan_files([half])
            report = send(files, "127.0.0.1", node.settings.port, calling_ae="T", called_ae="N")
            assert report.sent == len(files)
        for node in nodes:
            assert node.indexer is not None and node.indexer.flush()
    finally:
        for node in nodes:
            node.stop(1)

    sessions = make_sessionmaker(make_engine(postgres_url))
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        assert session.scalar(select(func.count(Series.id)).where(Series.study_id == study.id)) == 1
        assert session.scalar(
            select(func.count(Instance.id)).join(Series).where(Series.study_id == study.id)
        ) == len(small_ct.datasets)

    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    first, second = StudyAssembler(sessions, 1), StudyAssembler(sessions, 1)
    completed = first.check(later) + second.check(later)
    assert [c.study_instance_uid for c in completed].count(study_uid) == 1
    with sessions() as session:
        events = session.scalars(select(StudyEvent).where(StudyEvent.study_id == study.id)).all()
        assert [(e.event, e.num_instances) for e in events] == [
            ("complete", len(small_ct.datasets))
        ]


def test_two_dispatchers_route_and_run_a_study_once(
    postgres_url: str, tmp_path: Path, small_ct: SyntheticSeries
) -> None:
    """Both nodes see the study complete; one job is made and run once, by one of them."""
    import time

    from db.models import Job, Output

    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    folder = tmp_path / "study"
    folder.mkdir()
    for index, dataset in enumerate(small_ct.datasets):
        fresh = copy.deepcopy(dataset)
        fresh.StudyInstanceUID, fresh.SeriesInstanceUID = study_uid, series_uid
        fresh.SOPInstanceUID = fresh.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
        fresh.save_as(folder / f"{index}.dcm", enforce_file_format=True)
    rule = {
        "name": f"pg-{series_uid[-8:]}",
        "match": {"SeriesInstanceUID": series_uid},
        "pipeline": ["gaussian"],
    }
    shared = tmp_path / "shared-data"  # one data_dir: the spool is shared storage
    nodes = [
        Node(
            local_settings(
                tmp_path / name,
                data_dir=shared,
                database_url=postgres_url,
                study_quiet_seconds=1,
                assembler_interval_seconds=0.2,
                rules=[rule],
            )
        )
        for name in ("node1", "node2")
    ]
    for node in nodes:
        node.start()
    try:
        files, _ = scan_files([folder])
        report = send(files, "127.0.0.1", nodes[0].settings.port, calling_ae="T", called_ae="N")
        assert report.sent == len(files)
        sessions = make_sessionmaker(make_engine(postgres_url))
        deadline = time.monotonic() + 60
        jobs: list[Job] = []
        while time.monotonic() < deadline:
            with sessions() as session:
                jobs = list(
                    session.scalars(select(Job).where(Job.series_instance_uid == series_uid))
                )
            if jobs and jobs[0].state in ("succeeded", "failed"):
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            node.stop(1)
    assert [(job.state, job.attempts) for job in jobs] == [("succeeded", 1)], jobs[0].error
    assert jobs[0].claimed_by in {node.settings.effective_node_name for node in nodes}
    with sessions() as session:
        outputs = session.scalar(select(func.count(Output.id)).where(Output.job_id == jobs[0].id))
    assert outputs == len(small_ct.datasets)  # the derived series, once


def test_another_node_indexing_the_same_study_and_instance_meanwhile(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The other node's insert lands between this one's look-up and its insert: of the
    study (the first insert of the transaction) and, later in it, of the same instance."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    earlier = now - dt.timedelta(seconds=5)
    mine = [
        record("1.1", "1.1.9", "1.1.1", tmp_path / "mine-1", now),
        record("1.1", "1.1.9", "1.1.3", tmp_path / "mine-3", now),
    ]
    theirs = [record("1.1", "1.1.9", "1.1.2", tmp_path / "theirs-2", earlier)]
    engine = sessions.kw["bind"]
    racing = writer_gets_in_first(engine, "studies", lambda other: write_batch(other, theirs))
    with racing as race, sessions.begin() as session:
        assert write_batch(session, mine[:1]) == []
    assert race.happened
    theirs = [record("1.1", "1.1.9", "1.1.3", tmp_path / "theirs-3", earlier)]
    racing = writer_gets_in_first(engine, "instances", lambda other: write_batch(other, theirs))
    with racing as race, sessions.begin() as session:
        assert write_batch(session, mine[1:]) == [tmp_path / "theirs-3"]
    assert race.happened
    with sessions() as session:
        assert session.scalar(select(func.count(Study.id))) == 1
        assert session.scalar(select(func.count(Series.id))) == 1
        paths = session.scalars(select(Instance.path).order_by(Instance.sop_instance_uid))
        assert list(paths) == [str(tmp_path / name) for name in ("mine-1", "theirs-2", "mine-3")]


def test_two_nodes_making_the_same_job_at_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    from dicom_node.jobs.state import create_jobs
    from tests.dicom_node.test_routing import add_series, settings_with, study_id

    add_series(Spool(tmp_path / "spool", fsync=False), sessions, number=1)
    settings = settings_with({"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]})
    target = study_id(sessions)

    def other_node(other: Session) -> None:
        create_jobs(other, settings, target)

    racing = writer_gets_in_first(sessions.kw["bind"], "jobs", other_node)
    with racing as race, sessions.begin() as session:
        made = [job.id for job in create_jobs(session, settings, target)]
    assert race.happened
    with sessions() as session:
        stored = list(session.scalars(select(Job)))
    assert [(job.id, job.state, job.pipeline) for job in stored] == [
        (made[0], JobState.QUEUED, ["gaussian"])
    ]
