"""The C-STORE transport, against a real node (pynetdicom) as the receiving end."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Association, ExportState
from db.session import make_engine, make_sessionmaker
from dicom_node.config import Settings
from dicom_node.dimse_status import DimseStatus
from dicom_node.export.cstore import outcome, send
from dicom_node.export.queue import enqueue, retry
from dicom_node.export.transport import Outcome
from dicom_node.export.worker import deliver_due
from dicom_node.node import Node
from dicom_node.scu import scan_files
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings
from tests.dicom_node.export.export_support import (
    T0,
    received,
    refusing_target,
    rows,
    target_for,
    uid_of,
)


def test_a_failure_status_fails_only_that_instance(
    sessions: sessionmaker[Session],
    series_files: list[Path],
    node: Node,
    settings: Settings,
    tmp_path: Path,
) -> None:
    bad = dcmread(series_files[0])
    # the node answers 0xC000 for this one
    bad["StudyInstanceUID"] = DataElement(
        "StudyInstanceUID", "UI", "1.2.not-a-uid", validation_mode=config.IGNORE
    )
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


DUPLICATE_REFUSED = "status 0xC000 Duplicate SOP Instance refused"


@pytest.mark.parametrize(
    ("status", "failure", "sent", "expected"),
    [
        (DimseStatus.SUCCESS, None, True, Outcome(True)),
        (DimseStatus.COERCION_OF_DATA_ELEMENTS, None, True, Outcome(True)),
        (DimseStatus.ELEMENTS_DISCARDED, None, True, Outcome(True)),
        (DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING, None, True, Outcome(True)),
        (DimseStatus.DUPLICATE_SOP_INSTANCE, "status 0x0111", True, Outcome(True)),
        (0xC000, DUPLICATE_REFUSED, True, Outcome(True, DUPLICATE_REFUSED)),
        (0xA700, "status 0xA700 no room", True, Outcome(False, "status 0xA700 no room")),
        (0xA701, None, True, Outcome(False, "status 0xA701 (Refused: Out of Resources)")),
        (None, None, True, Outcome(False, "no response")),
        (None, None, False, Outcome(False, "no association with pacs")),
    ],
)
def test_each_answer_becomes_an_outcome(
    status: int | None, failure: str | None, sent: bool, expected: Outcome
) -> None:
    assert outcome(status, failure, sent, "no association with pacs") == expected


def test_an_unreachable_peer_fails_every_file(series_files: list[Path]) -> None:
    files, _ = scan_files(series_files)
    seen: list[int | None] = []
    outcomes = send(refusing_target(), files, lambda _file, status: seen.append(status))
    assert set(outcomes) == set(series_files) and not seen
    assert all(not o.delivered and "no association" in (o.error or "") for o in outcomes.values())
