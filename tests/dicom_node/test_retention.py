"""Retention: a study's spool files and a job's outputs are deleted once done and old
enough, or oldest first below the disk watermark; never while a job or an export still
needs them; the rows stay, marked purged, and each purge is audited."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db.models import (
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Output,
    OutputKind,
    Series,
    Study,
    StudyEvent,
    StudyEventKind,
    StudyStatus,
)
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.disk_space import free_bytes
from dicom_node.index import stored_record_from_file, write_batch
from dicom_node.outputs import upsert_outputs
from dicom_node.process import OutputRecord
from dicom_node.queries.paging import EVERYTHING
from dicom_node.queries.studies import StudyFilters, search_studies
from dicom_node.retention import (
    RetentionPass,
    RetentionThread,
    done_studies,
    run_retention,
)
from dicom_node.security.audit import AuditAction
from dicom_node.storage import InstanceKey, Spool
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.small_fs import mounted_tmpfs

MiB = 1024 * 1024
DAY = dt.timedelta(days=1)


@dataclass
class ReceivedStudy:
    study_id: int
    uid: str
    series_id: int
    series_uid: str
    files: list[Path]


class Site:
    """A data folder and its index, filled the way the receiver and indexer would."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = Spool(settings.spool_dir, fsync=False)
        self.count = 0

    def receive(self, *, slices: int = 3, size: int = 16, complete: bool = True) -> ReceivedStudy:
        """A study spooled and indexed now; complete (and routed) unless told otherwise."""
        self.count += 1
        series = generate_series(
            num_slices=slices, rows=size, columns=size, uid_seed=f"retention-{self.count}"
        )
        records = []
        for dataset in series.datasets:
            key = InstanceKey(
                dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
            )
            folder = self.settings.data_dir / "sent"
            folder.mkdir(parents=True, exist_ok=True)
            source = folder / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(source, enforce_file_format=True)
            path, _size = self.spool.write(key, [source.read_bytes()])
            records.append(stored_record_from_file(path, received_at=dt.datetime.now(dt.UTC)))
        with self.sessions.begin() as session:
            write_batch(session, records)
        uid = series.datasets[0].StudyInstanceUID
        with self.sessions.begin() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
            series_row = session.scalars(select(Series).where(Series.study_id == study.id)).one()
            if complete:
                study.status = StudyStatus.COMPLETE
                study.completed_at = dt.datetime.now(dt.UTC)
            received = ReceivedStudy(
                study.id,
                uid,
                series_row.id,
                series_row.series_instance_uid,
                [record.path for record in records],
            )
        return received

    def job(self, study: ReceivedStudy, state: JobState = JobState.SUCCEEDED) -> int:
        with self.sessions.begin() as session:
            job = Job(
                study_id=study.study_id,
                series_id=study.series_id,
                series_instance_uid=study.series_uid,
                rule_name=f"rule-{self.count}-{state}",
                pipeline=["gaussian"],
                params={},
                destinations=["pacs"],
                state=state,
                not_before=dt.datetime.now(dt.UTC),
                finished_at=dt.datetime.now(dt.UTC) if state != JobState.QUEUED else None,
            )
            session.add(job)
            session.flush()
            return job.id

    def output(self, job_id: int, export: ExportState | None, destination: str = "pacs") -> Path:
        """An output file of the job under ``outputs/job-N`` and its export in ``export``."""
        self.count += 1
        uid = f"2.25.{900 + self.count}"
        path = self.settings.outputs_dir / f"job-{job_id}" / "seg" / f"{uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096))
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            output = Output(
                sop_instance_uid=uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                kind=OutputKind.SEG,
                path=str(path),
                series_instance_uid=f"2.25.{800 + self.count}",
                source_series_uid=job.series_instance_uid,
                processor_name="threshold_segment",
                processor_version="1",
                params={},
                job_id=job_id,
            )
            session.add(output)
            session.flush()
            if export is not None:
                self.export(session, uid, str(path), export, destination, output.id)
        return path

    @staticmethod
    def export(
        session: Session,
        uid: str,
        path: str,
        state: ExportState,
        destination: str = "pacs",
        output_id: int | None = None,
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        session.add(
            Export(
                destination=destination,
                host="127.0.0.1",
                port=104,
                ae_title="PACS",
                sop_instance_uid=uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                path=path,
                state=state,
                attempts=1,
                max_attempts=3,
                next_attempt_at=now,
                delivered_at=now if state == ExportState.DELIVERED else None,
                output_id=output_id,
            )
        )

    def purged_at(self, study: ReceivedStudy) -> tuple[dt.datetime | None, list[bool]]:
        with self.sessions() as session:
            row = session.get(Study, study.study_id)
            assert row is not None
            instances = session.scalars(
                select(Instance.purged_at).where(Instance.series_id == study.series_id)
            )
            return row.purged_at, [when is not None for when in instances]


@pytest.fixture(scope="module")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty index at the current schema, copied for each test (migrating is slow)."""
    path = tmp_path_factory.mktemp("retention-template") / "index.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def site_for(migrated_database: Path) -> Callable[..., Site]:
    def make(root: Path, **settings: object) -> Site:
        database = root / "index.db"
        shutil.copyfile(migrated_database, database)
        values: dict[str, object] = {
            "retention_spool_hours": 24.0,
            "retention_outputs_hours": 48.0,
            "database_url": f"sqlite:///{database}",
        }
        values.update(settings)
        configured = local_settings(root, **values)
        engine = make_engine(configured.effective_database_url)
        return Site(configured, make_sessionmaker(engine))

    return make


@pytest.fixture
def site(tmp_path: Path, site_for: Callable[..., Site]) -> Site:
    return site_for(tmp_path)


def later(hours: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)


def test_a_done_study_goes_after_its_age_and_its_rows_stay_marked(site: Site) -> None:
    study = site.receive()
    site.output(site.job(study), ExportState.DELIVERED)
    sizes = sum(path.stat().st_size for path in study.files)

    early = run_retention(site.sessions, site.settings, now=later(23))
    assert early.purged == [] and all(path.exists() for path in study.files)

    report = run_retention(site.sessions, site.settings, now=later(25))
    [purged] = report.purged
    assert (purged.kind, purged.reason, purged.study_instance_uid) == ("study", "age", study.uid)
    assert (purged.files, purged.bytes) == (len(study.files), sizes)
    assert not any(path.exists() for path in study.files)
    assert not (site.settings.spool_dir / study.uid).exists()  # its empty folders too
    study_purged, instances_purged = site.purged_at(study)
    assert study_purged is not None and instances_purged == [True] * len(study.files)
    with site.sessions() as session:
        [summary] = search_studies(session, StudyFilters(), EVERYTHING).items
        events = audit_rows(session, AuditAction.DATA_PURGED)
    assert summary.purged_at is not None and summary.num_instances == len(study.files)
    [event] = events
    assert event["study_instance_uid"] == study.uid and event["count"] == len(study.files)
    assert event["details"] == {"what": "spool", "reason": "age", "files": 3, "bytes": sizes}
    # Outputs have a longer retention of their own.
    assert (site.settings.outputs_dir / "job-1").is_dir()
    assert run_retention(site.sessions, site.settings, now=later(25)).purged == []


def _blocker(site: Site, study: ReceivedStudy, blocker: str) -> None:
    if blocker.startswith("job "):
        site.job(study, JobState(blocker.removeprefix("job ")))
    elif blocker.startswith("export "):
        site.output(site.job(study), ExportState(blocker.removeprefix("export ")))
    elif blocker.startswith("de-identified copy "):
        state = ExportState(blocker.removeprefix("de-identified copy "))
        with site.sessions.begin() as session:
            uid = session.scalars(
                select(Instance.sop_instance_uid).where(Instance.series_id == study.series_id)
            ).first()
            assert uid is not None
            site.export(session, uid, str(study.files[0]), state, "research")
    elif blocker == "complete event not routed":
        with site.sessions.begin() as session:
            session.add(
                StudyEvent(
                    study_id=study.study_id,
                    event=StudyEventKind.COMPLETE,
                    at=dt.datetime.now(dt.UTC),
                    num_instances=3,
                )
            )
    else:
        assert blocker == "still receiving"


BLOCKERS = (
    "job queued",
    "job running",
    "job failed",
    "export pending",
    "export sending",
    "export failed",
    "de-identified copy pending",
    "de-identified copy failed",
    "complete event not routed",
    "still receiving",
)


def test_never_while_something_still_needs_it_not_even_for_disk_space(
    tmp_path: Path, site_for: Callable[..., Site]
) -> None:
    site = site_for(tmp_path, retention_free_bytes=10**18)
    blocked = {}
    for blocker in BLOCKERS:
        blocked[blocker] = study = site.receive(complete=blocker != "still receiving")
        _blocker(site, study, blocker)
    done = site.receive()
    report = run_retention(site.sessions, site.settings, now=later(10_000))
    assert [item.study_instance_uid for item in report.purged if item.kind == "study"] == [done.uid]
    for blocker, study in blocked.items():
        assert all(path.exists() for path in study.files), blocker
        assert site.purged_at(study) == (None, [False] * len(study.files)), blocker


def test_cancelled_work_and_a_study_without_jobs_are_done(site: Site) -> None:
    without_jobs = site.receive()
    cancelled = site.receive()
    site.job(cancelled, JobState.CANCELLED)
    site.output(site.job(cancelled), ExportState.CANCELLED)
    report = run_retention(site.sessions, site.settings, now=later(25))
    assert {item.study_instance_uid for item in report.purged if item.kind == "study"} == {
        without_jobs.uid,
        cancelled.uid,
    }


def test_a_delivery_counts_only_once_committed_where_the_destination_asks(site: Site) -> None:
    study = site.receive()
    site.output(site.job(study), ExportState.DELIVERED, destination="pacs")
    with site.sessions() as session:
        assert [done.study_id for done in done_studies(session, [])] == [study.study_id]
        assert done_studies(session, ["pacs"]) == []
        assert [done.study_id for done in done_studies(session, ["other"])] == [study.study_id]
    committed = site.receive()
    site.output(site.job(committed), ExportState.COMMITTED, destination="pacs")
    with site.sessions() as session:
        assert [done.study_id for done in done_studies(session, ["pacs"])] == [committed.study_id]


def test_outputs_go_once_their_exports_are_delivered(site: Site) -> None:
    delivered = site.receive()
    delivered_job = site.job(delivered)
    files = [site.output(delivered_job, ExportState.DELIVERED) for _ in range(2)]
    (files[0].parent.parent / "steps").mkdir()
    (files[0].parent.parent / "steps" / "1-gaussian.json").write_text("[]")
    waiting = site.receive()
    waiting_job = site.job(waiting)
    kept = [
        site.output(waiting_job, ExportState.DELIVERED),
        site.output(waiting_job, ExportState.PENDING),
    ]
    report = run_retention(site.sessions, site.settings, now=later(49))
    outputs = [item for item in report.purged if item.kind == "outputs"]
    assert [(item.job_id, item.files, item.bytes) for item in outputs] == [
        (delivered_job, 3, 2 * 4096 + 2)
    ]
    assert not (site.settings.outputs_dir / f"job-{delivered_job}").exists()
    assert all(path.exists() for path in kept)
    with site.sessions() as session:
        marks = dict(session.execute(select(Output.job_id, Output.purged_at)).all())
        events = audit_rows(session, AuditAction.DATA_PURGED)
    assert marks[delivered_job] is not None and marks[waiting_job] is None
    [outputs_event] = [event for event in events if event["details"]["what"] == "outputs"]
    assert outputs_event["object_id"] == str(delivered_job) and outputs_event["count"] == 2
    assert outputs_event["series_instance_uid"] == delivered.series_uid


def test_an_output_a_job_writes_again_is_no_longer_purged(site: Site) -> None:
    study = site.receive()
    job_id = site.job(study)
    path = site.output(job_id, ExportState.DELIVERED)
    run_retention(site.sessions, site.settings, now=later(49))
    with site.sessions.begin() as session:
        output = session.scalars(select(Output)).one()
        assert output.purged_at is not None and not path.exists()
        record = OutputRecord(
            output.sop_instance_uid,
            output.sop_class_uid,
            output.series_instance_uid,
            "seg",
            path,
            output.source_series_uid,
            "threshold_segment",
            "1",
            "{}",
        )
        upsert_outputs(session, [record], job_id)
    with site.sessions() as session:
        assert session.scalars(select(Output.purged_at)).one() is None


def test_a_dry_run_says_what_would_go_and_deletes_nothing(site: Site) -> None:
    study = site.receive()
    report = run_retention(site.sessions, site.settings, now=later(25), dry_run=True)
    assert [item.study_instance_uid for item in report.purged] == [study.uid]
    assert report.bytes_freed == sum(path.stat().st_size for path in study.files)
    assert all(path.exists() for path in study.files)
    assert site.purged_at(study) == (None, [False] * 3)


def test_a_file_written_again_after_it_was_chosen_is_kept(site: Site) -> None:
    study = site.receive()
    # The first instance was sent again (and acknowledged) while the study was purged:
    # its new copy is younger than the row that named the old one.
    newer = time.time() + 30
    os.utime(study.files[0], (newer, newer))
    report = run_retention(site.sessions, site.settings, now=later(25))
    assert report.purged[0].files == len(study.files) - 1
    assert study.files[0].exists() and not study.files[1].exists()


def test_two_passes_purge_a_study_once(site: Site) -> None:
    site.receive()
    with site.sessions() as session:
        [chosen] = done_studies(session, [])
    assert len(run_retention(site.sessions, site.settings, now=later(25)).purged) == 1
    # Another node chose it too, before this one's claim committed: its claim finds none.
    other = RetentionPass(site.sessions, site.settings, later(25), dry_run=False)
    assert other.purge_study(chosen, "age") is None
    with site.sessions() as session:
        assert len(audit_rows(session, AuditAction.DATA_PURGED)) == 1


def test_an_instance_of_a_purged_study_received_again_is_stored_and_indexed(
    site: Site,
) -> None:
    study = site.receive()
    run_retention(site.sessions, site.settings, now=later(25))
    assert not study.files[1].exists()
    # The sender sends one instance again; the receiver's spool cached the folders that
    # retention removed.
    again = study.files[1]
    with site.sessions() as session:
        uid = session.scalars(select(Instance.sop_instance_uid).where(Instance.path == str(again)))
        sop_uid = uid.one()
    source = site.settings.data_dir / "sent" / f"{sop_uid}.dcm"
    key = InstanceKey(study.uid, study.series_uid, sop_uid)
    path, _size = site.spool.write(key, [source.read_bytes()])
    assert path == again and again.exists()
    with site.sessions.begin() as session:
        write_batch(session, [stored_record_from_file(path)])
    study_purged, instances = site.purged_at(study)
    assert study_purged is None and sorted(instances) == [False, True, True]


def test_the_node_thread_purges_by_itself(tmp_path: Path, site_for: Callable[..., Site]) -> None:
    site = site_for(tmp_path, retention_spool_hours=0.0002, retention_interval_seconds=0.1)
    study = site.receive()
    thread = RetentionThread(site.sessions, site.settings)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while study.files[0].exists():
            assert time.monotonic() < deadline, "retention did not run"
            time.sleep(0.1)
    finally:
        thread.stop()
    assert site.purged_at(study)[0] is not None


# -- the disk watermark, on a file system whose free space only this test changes -----------


@pytest.fixture
def small_data_dir(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "small-fs", 32 * MiB) as mount_point:
        yield mount_point / "data"


def test_below_the_watermark_the_oldest_done_studies_go_first_until_above(
    tmp_path: Path, small_data_dir: Path, site_for: Callable[..., Site]
) -> None:
    site = site_for(tmp_path, data_dir=small_data_dir, retention_spool_hours=0)
    oldest, middle, newest = (site.receive(slices=4, size=256) for _ in range(3))
    busy = site.receive(slices=4, size=256)
    site.job(busy, JobState.RUNNING)
    with site.sessions.begin() as session:  # done one hour apart, oldest first
        for hours, study in enumerate((oldest, middle, newest)):
            completed = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3 - hours)
            session.execute(
                update(Study).where(Study.id == study.study_id).values(completed_at=completed)
            )
    one_study = sum(path.stat().st_size for path in oldest.files)
    assert one_study > MiB // 4
    free = free_bytes(small_data_dir)
    settings = site.settings.model_copy(update={"retention_free_bytes": free + one_study * 3 // 2})
    dry = run_retention(site.sessions, settings, dry_run=True)
    assert [item.study_instance_uid for item in dry.purged] == [oldest.uid, middle.uid]
    report = run_retention(site.sessions, settings)
    assert [(item.study_instance_uid, item.reason) for item in report.purged] == [
        (oldest.uid, "disk"),
        (middle.uid, "disk"),
    ]
    assert report.free_bytes_after >= settings.retention_free_bytes
    assert all(path.exists() for path in newest.files + busy.files)
    # Nothing more is done: below the mark again, the busy study stays.
    settings = settings.model_copy(update={"retention_free_bytes": 10**15})
    last = run_retention(site.sessions, settings)
    assert [item.study_instance_uid for item in last.purged] == [newest.uid]
    assert all(path.exists() for path in busy.files)


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """The command configures its process's logging (on its stderr): put it back after."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("logging_restored")
def test_the_command_line_dry_run_then_purge(tmp_path: Path, site_for: Callable[..., Site]) -> None:
    site = site_for(tmp_path, retention_spool_hours=0.0001)
    study = site.receive()
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{site.settings.data_dir}"\n'
        f'database_url = "{site.settings.effective_database_url}"\n'
        "retention_spool_hours = 0.0001\n"
    )
    time.sleep(0.5)  # older than its retention
    runner = CliRunner()
    dry = runner.invoke(app, ["retention", "--config", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete the files of 1 studies and the outputs of 0 jobs" in dry.output
    assert study.uid in dry.output and study.files[0].exists()
    done = runner.invoke(app, ["retention", "--config", str(config), "--json"])
    assert done.exit_code == 0, done.output
    found = json.loads(done.stdout)
    assert found["dry_run"] is False and found["bytes_freed"] > 0
    assert [item["study_instance_uid"] for item in found["purged"]] == [study.uid]
    assert not study.files[0].exists()
    listed = runner.invoke(app, ["studies", "--config", str(config)])
    assert "purged" in listed.output, listed.output
    again = runner.invoke(app, ["retention", "--config", str(config)])
    assert "deleted the files of 0 studies" in again.output


def test_passes_run_together_without_error(site: Site) -> None:
    for _ in range(3):
        site.receive()
    errors: list[BaseException] = []

    def one_pass() -> None:
        try:
            run_retention(site.sessions, site.settings, now=later(25))
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=one_pass) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with site.sessions() as session:
        assert len(audit_rows(session, AuditAction.DATA_PURGED)) == 3
