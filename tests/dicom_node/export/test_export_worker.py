"""Delivering due exports, against a real node (pynetdicom) as the receiving end."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import get_args

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditAction, AuditEvent, Export, ExportState
from dicom_node.config import Settings
from dicom_node.export.queue import DeliveryReport, enqueue, retry
from dicom_node.export.target import ExportTarget, TransportKind
from dicom_node.export.transport import OnSent, Outcome
from dicom_node.export.worker import TRANSPORTS, Exporter, deliver_due
from dicom_node.node import Node
from dicom_node.scu import SendFile
from dicom_node.synthetic import generate_series
from tests.dicom_node.export.export_support import (
    FAST,
    T0,
    migrated_sessions,
    received,
    refusing_target,
    rows,
    target_for,
    uid_of,
)


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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[sessionmaker[Session]]:
    """The database several exporters share: SQLite, and PostgreSQL (SKIP LOCKED claims)."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            from dicom_node.testing_postgres import fresh_postgres_database

            url = fresh_postgres_database()
        else:
            url = f"sqlite:///{tmp_path / 'shared.db'}"
        yield stack.enter_context(migrated_sessions(url))


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


def test_every_kind_of_destination_has_its_transport() -> None:
    assert set(TRANSPORTS) == set(get_args(TransportKind))


class RecordingTransport:
    """A transport that stores nothing: it delivers every file but the first, and says so."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Path]]] = []

    def send(
        self, target: ExportTarget, files: Sequence[SendFile], on_sent: OnSent | None
    ) -> dict[Path, Outcome]:
        self.sent.append((target.name, [item.path for item in files]))
        outcomes = {item.path: Outcome(True) for item in files}
        outcomes[files[0].path] = Outcome(False, "refused by the fake")
        return outcomes


def test_a_destination_is_sent_with_the_transport_of_its_kind(
    sessions: sessionmaker[Session],
    series_files: list[Path],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = RecordingTransport()
    monkeypatch.setitem(TRANSPORTS, "c-store", fake)
    target = target_for(settings, max_attempts=1)
    with sessions() as session, session.begin():
        exported = enqueue(session, target, series_files, now=T0)
    report = deliver_due(sessions, [target], T0)
    assert fake.sent == [("pacs", [Path(row.path) for row in exported])]
    assert report.failed == [exported[0].id]
    assert report.errors == {exported[0].id: "refused by the fake"}
    assert sorted(report.delivered) == sorted(row.id for row in exported[1:])


class BrokenTransport:
    """Raises for the whole batch, or answers for none of its files."""

    def __init__(self, raises: bool) -> None:
        self.raises = raises

    def send(
        self, target: ExportTarget, files: Sequence[SendFile], on_sent: OnSent | None
    ) -> dict[Path, Outcome]:
        if self.raises:
            raise RuntimeError("transport bug")
        return {}


@pytest.mark.parametrize(
    ("raises", "error"),
    [(True, "c-store: RuntimeError: transport bug"), (False, "the c-store transport gave no")],
)
def test_a_transport_that_raises_or_says_nothing_costs_an_attempt(
    sessions: sessionmaker[Session],
    series_files: list[Path],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    raises: bool,
    error: str,
) -> None:
    monkeypatch.setitem(TRANSPORTS, "c-store", BrokenTransport(raises))
    target = target_for(settings)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files[:2], now=T0)
    report = deliver_due(sessions, [target], T0, policy=FAST)
    assert len(report.retrying) == 2
    assert all(e.startswith(error) for e in report.errors.values())
    assert all(r.state == ExportState.PENDING and r.attempts == 1 for r in rows(sessions))


def wait_until(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


class AcknowledgingTransport:
    """Acknowledges its files one by one (status 0, as C-STORE does); after ``pause_after``
    of them it waits for ``until`` before going on."""

    def __init__(self, pause_after: int, until: Callable[[], bool]) -> None:
        self.pause_after = pause_after
        self.until = until

    def send(
        self, target: ExportTarget, files: Sequence[SendFile], on_sent: OnSent | None
    ) -> dict[Path, Outcome]:
        assert on_sent is not None
        for count, item in enumerate(files, start=1):
            on_sent(item, 0x0000)
            if count == self.pause_after:
                wait_until(self.until)
        return {item.path: Outcome(True) for item in files}


def test_acknowledged_rows_are_recorded_while_the_batch_is_still_sent(
    sessions: sessionmaker[Session],
    series_files: list[Path],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicom_node.export import worker

    monkeypatch.setattr(worker, "CHECKPOINT_SECONDS", 0.01)

    def delivered() -> int:
        return sum(1 for row in rows(sessions) if row.state == ExportState.DELIVERED)

    # A node killed here, three acknowledged, would send only the last two again.
    monkeypatch.setitem(TRANSPORTS, "c-store", AcknowledgingTransport(3, lambda: delivered() == 3))
    target = target_for(settings)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files, now=T0)
    seen: list[int | None] = []
    report = deliver_due(sessions, [target], T0, on_sent=lambda _id, status: seen.append(status))
    assert seen == [0] * 5  # the caller's on_sent still sees every one
    assert sorted(report.delivered) == sorted(r.id for r in rows(sessions))  # each once
    assert all(r.state == ExportState.DELIVERED and r.attempts == 1 for r in rows(sessions))
    with sessions() as session:
        audited = session.scalars(
            select(AuditEvent.object_id).where(AuditEvent.action == AuditAction.OUTPUT_EXPORTED)
        ).all()
    assert sorted(audited) == sorted(str(r.id) for r in rows(sessions))


def test_a_checkpoint_that_cannot_be_written_leaves_its_rows_to_the_batch(
    sessions: sessionmaker[Session],
    series_files: list[Path],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicom_node.export import worker

    monkeypatch.setattr(worker, "CHECKPOINT_SECONDS", 0.01)
    real_record = worker.record
    written: list[int] = []

    def locked_while_sending(*args: object, **kwargs: object) -> None:
        written.append(len(args[2]))  # type: ignore[arg-type]
        if threading.current_thread().name == "export-checkpoint":
            raise OSError("database is locked")
        real_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "record", locked_while_sending)
    monkeypatch.setitem(TRANSPORTS, "c-store", AcknowledgingTransport(2, lambda: bool(written)))
    target = target_for(settings)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files, now=T0)
    report = deliver_due(sessions, [target], T0)
    assert len(written) >= 2 and written[-1] == 5  # failed checkpoints, then the batch
    assert len(report.delivered) == 5
    assert all(r.state == ExportState.DELIVERED and r.attempts == 1 for r in rows(sessions))
