"""Export with retries (SQLite), against a real node (pynetdicom) as the receiving end."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db.models import Association, Export, ExportState, Output
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.export import (
    DeliveryReport,
    Exporter,
    ExportError,
    ExportTarget,
    RetryPolicy,
    deliver_due,
    enqueue,
    recover_interrupted,
    retry,
)
from dicom_node.node import Node
from dicom_node.synthetic import generate_series
from dicom_node.testing import free_port, local_settings

T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.UTC)
FAST = RetryPolicy(base_seconds=2.0, cap_seconds=600.0, jitter=0.5)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'exports.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    series = generate_series(num_slices=5, rows=64, columns=64, uid_seed="export-unit")
    return series.write(tmp_path_factory.mktemp("series"))


def target_for(node_settings: Settings, name: str = "pacs", **kwargs: object) -> ExportTarget:
    return ExportTarget(
        name=name,
        host="127.0.0.1",
        port=node_settings.port,
        ae_title=node_settings.ae_title,
        calling_ae_title="EXPORTER",
        timeout=10.0,
        **kwargs,  # type: ignore[arg-type]
    )


def refusing_target(name: str = "pacs", max_attempts: int = 3) -> ExportTarget:
    return ExportTarget(
        name, "127.0.0.1", free_port(), "NOBODY", max_attempts=max_attempts, timeout=5.0
    )


def received(node_settings: Settings) -> set[str]:
    return {path.stem for path in node_settings.spool_dir.rglob("*.dcm")}


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def rows(sessions: sessionmaker[Session]) -> list[Export]:
    with sessions() as session:
        return list(session.scalars(select(Export).order_by(Export.id)))


def test_enqueue_is_one_row_per_destination_and_instance(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings, tmp_path: Path
) -> None:
    pacs, other = target_for(settings), target_for(settings, name="archive", max_attempts=4)
    with sessions() as session, session.begin():
        first = enqueue(session, pacs, series_files, now=T0)
        again = enqueue(session, pacs, series_files[:2], now=T0)
        enqueue(session, other, series_files[:1], now=T0)
    assert [row.id for row in again] == [row.id for row in first[:2]]
    stored = rows(sessions)
    assert len(stored) == 6
    assert {row.destination for row in stored} == {"pacs", "archive"}
    assert all(row.state == ExportState.PENDING and row.attempts == 0 for row in stored)
    assert {row.sop_instance_uid for row in stored} == {uid_of(p) for p in series_files}
    assert [row.max_attempts for row in stored if row.destination == "archive"] == [4]
    assert stored[0].host == "127.0.0.1" and stored[0].port == settings.port

    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    with sessions() as session, pytest.raises(ExportError, match=r"notes\.txt"):
        enqueue(session, pacs, [not_dicom])


def test_enqueue_outputs_links_them(
    sessions: sessionmaker[Session], series_files: list[Path]
) -> None:
    header = dcmread(series_files[0], stop_before_pixels=True)
    with sessions() as session, session.begin():
        output = Output(
            sop_instance_uid=str(header.SOPInstanceUID),
            sop_class_uid=str(header.SOPClassUID),
            kind="derived",
            path=str(series_files[0]),
            series_instance_uid=str(header.SeriesInstanceUID),
            source_series_uid=str(header.SeriesInstanceUID),
            processor_name="gaussian",
            processor_version="1",
            params="{}",
        )
        session.add(output)
        session.flush()
        (row,) = enqueue(session, ExportTarget("pacs", "127.0.0.1", 104, "PACS"), [output])
        assert row.output_id == output.id
        assert row.sop_instance_uid == output.sop_instance_uid


def test_due_exports_are_delivered_once(
    sessions: sessionmaker[Session], series_files: list[Path], node: Node, settings: Settings
) -> None:
    target = target_for(settings)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files, now=T0)
    report = deliver_due(sessions, [target], T0)
    assert report.claimed == 5 and len(report.delivered) == 5
    assert not report.retrying and not report.failed
    assert received(settings) == {uid_of(p) for p in series_files}
    stored = rows(sessions)
    assert all(r.state == ExportState.DELIVERED and r.attempts == 1 for r in stored)
    assert all(r.delivered_at is not None and r.last_error is None for r in stored)
    assert deliver_due(sessions, [target], T0 + dt.timedelta(hours=1)).claimed == 0
    with sessions() as session, session.begin():  # exporting them again changes nothing
        enqueue(session, target, series_files, now=T0)
    assert deliver_due(sessions, [target], T0 + dt.timedelta(hours=1)).claimed == 0


def test_unreachable_destination_backs_off_then_fails_and_retry_revives(
    sessions: sessionmaker[Session], series_files: list[Path], node: Node, settings: Settings
) -> None:
    refusing = refusing_target(max_attempts=3)
    with sessions() as session, session.begin():
        enqueue(session, refusing, series_files[:2], now=T0)
    rng = random.Random(1)

    first = deliver_due(sessions, [refusing], T0, policy=FAST, rng=rng)
    assert len(first.retrying) == 2 and not first.delivered
    stored = rows(sessions)
    assert all(r.state == ExportState.PENDING and r.attempts == 1 for r in stored)
    assert all("no association" in (r.last_error or "") for r in stored)
    assert str(refusing.port) in (stored[0].last_error or "")
    # Not due before the backoff has passed: between 1 and 2 s after the attempt.
    assert deliver_due(sessions, [refusing], T0, policy=FAST).claimed == 0
    for row in stored:
        wait = (
            row.next_attempt_at.replace(tzinfo=dt.UTC) - dt.datetime.now(dt.UTC)
        ).total_seconds()
        assert 0.5 < wait <= 2.0

    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    second = deliver_due(sessions, [refusing], later, policy=FAST, rng=rng)
    assert len(second.retrying) == 2
    third = deliver_due(sessions, [refusing], later + dt.timedelta(hours=1), policy=FAST)
    assert sorted(third.failed) == sorted(r.id for r in stored)
    stored = rows(sessions)
    assert all(r.state == ExportState.FAILED and r.attempts == 3 for r in stored)
    assert all("no association" in (r.last_error or "") for r in stored)
    assert deliver_due(sessions, [refusing], later + dt.timedelta(days=1)).claimed == 0

    # The destination is fixed (same name, right port); an admin retries one export.
    fixed = target_for(settings)
    with sessions() as session, session.begin():
        revived = retry(session, stored[0].id)
        assert revived is not None and revived.state == ExportState.PENDING
        assert revived.attempts == 3 and revived.last_error is None
        assert retry(session, 10_000) is None
    report = deliver_due(sessions, [fixed], dt.datetime.now(dt.UTC))
    assert report.delivered == [stored[0].id]
    after = rows(sessions)
    assert after[0].state == ExportState.DELIVERED and after[0].attempts == 4
    assert after[0].port == settings.port  # the snapshot says where it went
    assert after[1].state == ExportState.FAILED


def test_a_failure_status_fails_only_that_instance(
    sessions: sessionmaker[Session],
    series_files: list[Path],
    node: Node,
    settings: Settings,
    tmp_path: Path,
) -> None:
    bad = dcmread(series_files[0])
    bad.StudyInstanceUID = "1.2.not-a-uid"  # the node answers 0xC000 for this one
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.99.1"
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path, enforce_file_format=True)
    target = target_for(settings, max_attempts=2)
    with sessions() as session, session.begin():
        good_rows = enqueue(session, target, series_files, now=T0)
        (bad_row,) = enqueue(session, target, [bad_path], now=T0)
    report = deliver_due(sessions, [target], T0)
    assert sorted(report.delivered) == sorted(r.id for r in good_rows)
    assert report.retrying == [bad_row.id]
    assert report.errors[bad_row.id].startswith("status 0xC000")
    assert received(settings) == {uid_of(p) for p in series_files}
    final = deliver_due(sessions, [target], dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert final.failed == [bad_row.id] and final.claimed == 1


def test_a_duplicate_answer_counts_as_delivered(
    sessions: sessionmaker[Session], series_files: list[Path], tmp_path: Path
) -> None:
    strict = local_settings(tmp_path / "strict", duplicate_policy="reject")
    receiver = Node(strict)
    receiver.start()
    try:
        target = target_for(strict)
        with sessions() as session, session.begin():
            exported = enqueue(session, target, series_files[:2], now=T0)
        assert len(deliver_due(sessions, [target], T0).delivered) == 2
        with sessions() as session, session.begin():
            for row in exported:
                retry(session, row.id, now=T0)
        seen: list[int | None] = []
        again = deliver_due(sessions, [target], T0, on_sent=lambda _id, status: seen.append(status))
    finally:
        receiver.stop(grace_seconds=5)
    assert seen == [0xC000, 0xC000]  # "Duplicate SOP Instance refused"
    assert sorted(again.delivered) == sorted(r.id for r in exported) and not again.retrying
    assert all(r.state == ExportState.DELIVERED and r.attempts == 2 for r in rows(sessions))


def test_a_missing_file_costs_an_attempt_with_the_reason(
    sessions: sessionmaker[Session], series_files: list[Path], tmp_path: Path, settings: Settings
) -> None:
    copy = tmp_path / "gone.dcm"
    copy.write_bytes(series_files[0].read_bytes())
    target = target_for(settings, max_attempts=1)
    with sessions() as session, session.begin():
        (row,) = enqueue(session, target, [copy], now=T0)
    copy.unlink()
    report = deliver_due(sessions, [target], T0)
    assert report.failed == [row.id] and "file missing" in report.errors[row.id]


def test_rows_of_an_unconfigured_destination_wait(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings
) -> None:
    with sessions() as session, session.begin():
        enqueue(session, target_for(settings, name="old-pacs"), series_files[:1], now=T0)
    assert deliver_due(sessions, [target_for(settings)], T0) == DeliveryReport()
    assert rows(sessions)[0].state == ExportState.PENDING
    with pytest.raises(ValueError, match="two export destinations"):
        deliver_due(sessions, [target_for(settings), refusing_target()], T0)


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    for attempts, full in [(1, 2.0), (2, 4.0), (3, 8.0), (9, 512.0), (10, 600.0), (500, 600.0)]:
        delays = [policy.delay(attempts, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), attempts
        assert max(delays) - min(delays) > full / 4  # jittered, not constant
    assert RetryPolicy(jitter=0).delay(4) == 16.0
    with pytest.raises(ValueError, match="max_attempts"):
        ExportTarget("pacs", "127.0.0.1", 104, "PACS", max_attempts=0)


def test_exporter_resumes_interrupted_sends_and_stops(
    sessions: sessionmaker[Session], series_files: list[Path], node: Node, settings: Settings
) -> None:
    target = target_for(settings)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files, now=T0)
        # A crash left two of them mid-send.
        session.execute(
            update(Export).where(Export.id.in_([1, 2])).values(state=ExportState.SENDING.value)
        )
    exporter = Exporter(sessions, [target], interval=0.05, policy=FAST)
    exporter.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(r.state == ExportState.DELIVERED for r in rows(sessions)):
                break
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="already running"):
            exporter.start()
    finally:
        exporter.stop(timeout=10)
    assert not exporter.running and exporter.rounds >= 1
    assert all(r.state == ExportState.DELIVERED for r in rows(sessions))
    assert received(settings) == {uid_of(p) for p in series_files}


def test_a_large_batch_goes_over_parallel_associations(
    sessions: sessionmaker[Session], node: Node, settings: Settings, tmp_path: Path
) -> None:
    files = generate_series(num_slices=20, rows=16, columns=16, uid_seed="parallel").write(
        tmp_path / "series"
    )
    target = target_for(settings, associations=3)
    with sessions() as session, session.begin():
        enqueue(session, target, files, now=T0)
    assert len(deliver_due(sessions, [target], T0).delivered) == 20
    assert received(settings) == {uid_of(p) for p in files}
    assert node.indexer is not None and node.indexer.flush()
    with make_sessionmaker(make_engine(settings.effective_database_url))() as session:
        titles = session.scalars(select(Association.calling_ae_title)).all()
    assert titles.count("EXPORTER") == 2  # 20 instances, at least 8 per association


def test_recovery_leaves_other_nodes_sends_alone(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings
) -> None:
    target = target_for(settings)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files[:3], now=T0)
        for export_id, node in [(1, "node-a"), (2, "node-b"), (3, None)]:
            session.execute(
                update(Export)
                .where(Export.id == export_id)
                .values(state=ExportState.SENDING.value, claimed_by=node)
            )
    assert recover_interrupted(sessions, node="node-a") == 2  # its own and the unclaimed one
    assert [(r.id, r.state, r.claimed_by) for r in rows(sessions)] == [
        (1, "pending", None),
        (2, "sending", "node-b"),
        (3, "pending", None),
    ]


def test_cli_lists_and_retries_exports(
    sessions: sessionmaker[Session], series_files: list[Path], tmp_path: Path
) -> None:
    data_dir = tmp_path / "cli-data"
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    url = f"sqlite:///{data_dir / 'dicom-node.db'}"
    upgrade(url)
    engine = make_engine(url)
    cli_sessions = make_sessionmaker(engine)
    refusing = refusing_target(max_attempts=1)
    with cli_sessions() as session, session.begin():
        enqueue(session, refusing, series_files[:1], now=T0)
    deliver_due(cli_sessions, [refusing], T0)
    runner = CliRunner()

    listed = runner.invoke(app, ["exports", "--json", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["state"] == "failed" and row["attempts"] == 1 and row["destination"] == "pacs"
    assert "no association" in row["last_error"] and row["sop_instance_uid"] == uid_of(
        series_files[0]
    )
    table = runner.invoke(app, ["exports", "--config", str(config)])
    assert table.exit_code == 0 and "failed" in table.stdout and "no association" in table.stdout

    retried = runner.invoke(app, ["exports", "retry", str(row["id"]), "--config", str(config)])
    assert retried.exit_code == 0, retried.output
    with cli_sessions() as session:
        back = session.get(Export, row["id"])
        assert back is not None and back.state == ExportState.PENDING and back.attempts == 1
    engine.dispose()

    unknown = runner.invoke(app, ["exports", "retry", "999", "--config", str(config)])
    assert unknown.exit_code == 1 and "no export with id 999" in unknown.output


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[sessionmaker[Session]]:
    """The database several exporters share: SQLite, and PostgreSQL (SKIP LOCKED claims)."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            from dicom_node.testing_postgres import running_postgres

            url = stack.enter_context(running_postgres())
        else:
            url = f"sqlite:///{tmp_path / 'shared.db'}"
        upgrade(url)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        yield make_sessionmaker(engine)


def test_concurrent_exporters_send_each_export_once(
    shared_sessions: sessionmaker[Session], tmp_path: Path, node: Node, settings: Settings
) -> None:
    files = generate_series(num_slices=12, rows=32, columns=32, uid_seed="export-race").write(
        tmp_path / "race"
    )
    target = target_for(settings)
    with shared_sessions() as session, session.begin():
        enqueue(session, target, files, now=T0)
    delivered: list[list[int]] = [[], [], []]
    start = threading.Barrier(3)

    def work(index: int) -> None:
        start.wait()
        while report := deliver_due(shared_sessions, [target], limit=2):
            if not report.claimed:
                return
            delivered[index].extend(report.delivered)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [export_id for part in delivered for export_id in part]
    assert sorted(every) == sorted(r.id for r in rows(shared_sessions))  # each exactly once
    assert all(r.state == ExportState.DELIVERED and r.attempts == 1 for r in rows(shared_sessions))
    assert received(settings) == {uid_of(p) for p in files}
