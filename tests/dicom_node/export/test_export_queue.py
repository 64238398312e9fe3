"""The exports queue (SQLite): enqueue, retry, recovery after a crash, the CLI on it."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db.models import Export, ExportState, Output, OutputKind
from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.export.queue import (
    DeliveryReport,
    ExportError,
    ExportStateConflictError,
    RetryPolicy,
    cancel,
    claim,
    enqueue,
    record,
    recover_interrupted,
    retry,
)
from dicom_node.export.target import ExportTarget
from dicom_node.export.transport import Outcome
from dicom_node.export.worker import deliver_due
from dicom_node.index import stored_record_from_file, write_batch
from dicom_node.security.audit import Actor, AuditAction
from tests.dicom_node.export.export_support import T0, refusing_target, rows, target_for, uid_of
from tests.dicom_node.security.audit_support import audit_rows

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


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


def test_enqueue_while_another_node_enqueues_the_same_instance(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings
) -> None:
    pacs = target_for(settings)

    def other_node(other: Session) -> None:
        enqueue(other, pacs, series_files[:1], now=T0)

    racing = writer_gets_in_first(sessions.kw["bind"], "exports", other_node)
    with racing as race, sessions() as session, session.begin():
        (row,) = enqueue(session, pacs, series_files[:1], now=T0)
    assert race.happened
    assert [(r.id, r.state) for r in rows(sessions)] == [(row.id, ExportState.PENDING)]


def added_output(
    session: Session, sop_uid: str, series_uid: str, source_series_uid: str, path: Path
) -> Output:
    """An output row (a derived image of ``source_series_uid``), flushed: it has its id."""
    output = Output(
        sop_instance_uid=sop_uid,
        sop_class_uid=CT_IMAGE_STORAGE,
        kind=OutputKind.DERIVED,
        path=str(path),
        series_instance_uid=series_uid,
        source_series_uid=source_series_uid,
        processor_name="gaussian",
        processor_version="1",
        params={},
    )
    session.add(output)
    session.flush()
    return output


def test_enqueue_outputs_links_them(
    sessions: sessionmaker[Session], series_files: list[Path]
) -> None:
    header = dcmread(series_files[0], stop_before_pixels=True)
    with sessions() as session, session.begin():
        output = added_output(
            session,
            str(header.SOPInstanceUID),
            str(header.SeriesInstanceUID),
            str(header.SeriesInstanceUID),
            series_files[0],
        )
        (row,) = enqueue(session, ExportTarget("pacs", "127.0.0.1", 104, "PACS"), [output])
        assert row.output_id == output.id
        assert row.sop_instance_uid == output.sop_instance_uid


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    for attempts, full in [(1, 2.0), (2, 4.0), (3, 8.0), (9, 512.0), (10, 600.0), (500, 600.0)]:
        delays = [policy.delay(attempts, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays), attempts
        assert max(delays) - min(delays) > full / 4  # jittered, not constant
    assert RetryPolicy(jitter=0).delay(4) == 16.0


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
    assert unknown.exit_code == 2 and "no export with id 999" in unknown.output


def test_each_send_is_audited_with_its_outcome_and_the_source_study(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings
) -> None:
    header = dcmread(series_files[0], stop_before_pixels=True)
    pacs = target_for(settings, max_attempts=2)
    with sessions() as session, session.begin():
        write_batch(session, [stored_record_from_file(series_files[0])])  # the source study
        output = added_output(
            session, "2.25.1001", "2.25.1000", str(header.SeriesInstanceUID), series_files[1]
        )
        enqueue(session, pacs, [output, series_files[2], series_files[3]], now=T0)
    delivered, retrying, failing = claim(sessions, ["pacs"], T0, 10, None)
    outcomes = {
        delivered.id: Outcome(delivered=True),
        retrying.id: Outcome(delivered=False, error="association refused"),
        failing.id: Outcome(delivered=False, error="timed out"),
    }
    batch = [delivered, retrying, replace(failing, attempts=1)]  # its last attempt
    record(sessions, pacs, batch, outcomes, RetryPolicy(), random.Random(0), DeliveryReport())
    sends = audit_rows(sessions, AuditAction.OUTPUT_EXPORTED)
    assert [(row["outcome"], row["reason"], row["object_id"]) for row in sends] == [
        ("success", None, str(delivered.id)),
        ("retrying", "association refused", str(retrying.id)),
        ("failure", "timed out", str(failing.id)),
    ]
    assert (sends[0]["study_instance_uid"], sends[0]["series_instance_uid"]) == (
        str(header.StudyInstanceUID),
        "2.25.1000",
    )
    assert [row["sop_instance_uid"] for row in sends] == [
        "2.25.1001",
        uid_of(series_files[2]),
        uid_of(series_files[3]),
    ]
    assert sends[0]["details"] == {"destination": "pacs", "transport": "c-store", "attempt": 1}
    assert {row["actor"] for row in sends} == {"exporter"}


def test_a_retry_asked_for_is_audited_with_who_asked(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings
) -> None:
    with sessions() as session, session.begin():
        (row,) = enqueue(session, target_for(settings), series_files[:1], now=T0)
    with sessions() as session, session.begin():
        retry(session, row.id, actor=Actor.api_token("ops"))
    [asked] = audit_rows(sessions, AuditAction.RETRY_REQUESTED)
    assert (asked["actor_kind"], asked["actor"], asked["object_id"]) == (
        "api_token",
        "ops",
        str(row.id),
    )
    assert asked["sop_instance_uid"] == uid_of(series_files[0])
    assert asked["details"] == {"destination": "pacs", "attempt": 0}


def test_a_cancelled_export_is_never_claimed_until_retried_or_enqueued_anew(
    sessions: sessionmaker[Session], series_files: list[Path], settings: Settings
) -> None:
    pacs, ops = target_for(settings), Actor.api_token("ops")
    with sessions() as session, session.begin():
        first, second = enqueue(session, pacs, series_files[:2], now=T0)
        cancel(session, first.id, actor=ops)
        cancel(session, second.id, actor=ops)
        with pytest.raises(ExportStateConflictError, match="is cancelled; only a pending"):
            cancel(session, first.id, actor=ops)
        assert cancel(session, 999, actor=ops) is None
    assert claim(sessions, ["pacs"], T0, 10, None) == []
    with sessions() as session, session.begin():
        retry(session, first.id, now=T0)
        enqueue(session, pacs, series_files[1:2], now=T0)  # a job that ran again made it
    assert sorted(c.id for c in claim(sessions, ["pacs"], T0, 10, None)) == [first.id, second.id]
    with sessions() as session, session.begin():
        with pytest.raises(ExportStateConflictError, match="is sending; only a pending"):
            cancel(session, first.id, actor=ops)
        with pytest.raises(ExportStateConflictError, match="being sent now"):
            retry(session, first.id)
    cancels = audit_rows(sessions, AuditAction.CANCEL_REQUESTED)
    assert [(row["actor"], row["object_id"]) for row in cancels] == [
        ("ops", str(first.id)),
        ("ops", str(second.id)),
    ]
