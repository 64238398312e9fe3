"""Storage commitment: the datasets both ways, the report's checks, and the export states."""

from __future__ import annotations

import datetime as dt
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditAction, AuditEvent, AuditOutcome, Export, ExportState
from dicom_node.ae.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    MalformedReportError,
    PendingTransactions,
    action_information,
    check_event_report,
    parse_event_information,
)
from dicom_node.config import ConfigError, load_settings
from dicom_node.dimse_status import DimseStatus
from dicom_node.export.commitment import apply_report, request_due
from dicom_node.export.queue import enqueue, retry
from dicom_node.export.target import ExportTarget
from dicom_node.records import CommitmentReported, CommittedInstance, FailedInstance
from tests.dicom_node.export.export_support import T0, rows

CT = "1.2.840.10008.5.1.4.1.1.2"
TRANSACTION = "2.25.1234"
TARGET = ExportTarget(
    "pacs",
    "127.0.0.1",
    104,
    "PACS",
    max_attempts=3,
    storage_commitment=True,
    commitment_timeout=60.0,
    commitment_requests=2,
)


def report_dataset(
    transaction_uid: str | None,
    committed: list[str],
    failed: list[tuple[str, int]],
) -> Dataset:
    dataset = Dataset()
    if transaction_uid is not None:
        dataset.TransactionUID = transaction_uid
    if committed:
        dataset.ReferencedSOPSequence = [reference(uid) for uid in committed]
    if failed:
        items = []
        for uid, reason in failed:
            item = reference(uid)
            item.FailureReason = reason
            items.append(item)
        dataset.FailedSOPSequence = items
    return dataset


def reference(sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def encoded(dataset: Dataset, implicit: bool = True) -> bytes:
    data = encode(dataset, implicit, True)
    assert data is not None
    return data


# ---------------------------------------------------------------------- datasets


def test_the_action_information_names_the_transaction_and_each_instance() -> None:
    dataset = action_information(TRANSACTION, [(CT, "1.2.3.1"), (CT, "1.2.3.2")])
    back = decode(BytesIO(encoded(dataset, implicit=False)), False, True)
    assert back.TransactionUID == TRANSACTION
    assert [
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in back.ReferencedSOPSequence
    ] == [
        (CT, "1.2.3.1"),
        (CT, "1.2.3.2"),
    ]


def test_a_report_with_failures_is_parsed_with_its_reasons() -> None:
    dataset = report_dataset(TRANSACTION, ["1.2.3.1"], [("1.2.3.2", 0x0112)])
    report = parse_event_information(dataset, 2, calling_ae_title="ORTHANC")
    assert report.transaction_uid == TRANSACTION
    assert report.committed == (CommittedInstance(CT, "1.2.3.1"),)
    assert report.failed == (FailedInstance(CT, "1.2.3.2", 0x0112),)
    assert report.calling_ae_title == "ORTHANC"


@pytest.mark.parametrize(
    ("dataset", "event_type", "problem"),
    [
        (report_dataset(None, ["1.2.3.1"], []), 1, "Transaction UID"),
        (report_dataset("not a uid", ["1.2.3.1"], []), 1, "Transaction UID"),
        (report_dataset(TRANSACTION, ["1.2.3.1"], [("1.2.3.2", 0x0112)]), 1, "event type 1"),
        (report_dataset(TRANSACTION, ["1.2.3.1"], []), 2, "event type 2"),
        (report_dataset(TRANSACTION, ["../../etc"], []), 1, "valid SOP"),
    ],
)
def test_malformed_reports_are_refused(dataset: Dataset, event_type: int, problem: str) -> None:
    with pytest.raises(MalformedReportError, match=problem):
        parse_event_information(dataset, event_type)


def check(
    pending: PendingTransactions,
    data: bytes | None,
    *,
    event_type: int | None = 1,
    sop_class: str = STORAGE_COMMITMENT_PUSH_MODEL,
    sop_instance: str = STORAGE_COMMITMENT_INSTANCE,
) -> tuple[int, CommitmentReported | None]:
    (status, _comment), report = check_event_report(
        sop_class, sop_instance, event_type, data, ImplicitVRLittleEndian, pending, "PACS"
    )
    return status, report


def test_the_receiver_answers_each_kind_of_bad_report_with_a_failure(tmp_path: Path) -> None:
    pending = PendingTransactions.under(tmp_path)
    pending.add(TRANSACTION)
    good = encoded(report_dataset(TRANSACTION, ["1.2.3.1"], []))
    assert check(pending, good, sop_class=CT) == (DimseStatus.NO_SUCH_SOP_CLASS, None)
    assert check(pending, good, sop_instance="1.2.3") == (DimseStatus.INVALID_OBJECT_INSTANCE, None)
    assert check(pending, good, event_type=3) == (DimseStatus.NO_SUCH_EVENT_TYPE, None)
    assert check(pending, good, event_type=None) == (DimseStatus.NO_SUCH_EVENT_TYPE, None)
    assert check(pending, None) == (DimseStatus.NO_SUCH_ARGUMENT, None)
    assert check(pending, b"\xff" * 37) == (DimseStatus.INVALID_ARGUMENT_VALUE, None)
    unknown = encoded(report_dataset("2.25.999", ["1.2.3.1"], []))
    assert check(pending, unknown) == (DimseStatus.INVALID_ARGUMENT_VALUE, None)
    status, report = check(pending, good)
    assert status == DimseStatus.SUCCESS
    assert report is not None and report.committed == (CommittedInstance(CT, "1.2.3.1"),)


def test_explicit_vr_reports_are_read_too(tmp_path: Path) -> None:
    pending = PendingTransactions.under(tmp_path)
    pending.add(TRANSACTION)
    data = encoded(report_dataset(TRANSACTION, ["1.2.3.1"], []), implicit=False)
    (status, _), report = check_event_report(
        STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_INSTANCE,
        1,
        data,
        ExplicitVRLittleEndian,
        pending,
        "PACS",
    )
    assert status == DimseStatus.SUCCESS and report is not None


def test_a_transaction_marker_is_never_a_path_a_peer_chose(tmp_path: Path) -> None:
    pending = PendingTransactions.under(tmp_path)
    assert "../x" not in pending
    with pytest.raises(ValueError, match="UID"):
        pending.add("../x")
    assert pending.listed() == []


def test_storage_commitment_is_refused_on_a_dicomweb_destination() -> None:
    destination = {"name": "web", "url": "http://pacs/dicom-web", "storage_commitment": True}
    with pytest.raises(ConfigError, match="storage_commitment"):
        load_settings(None, destinations=[destination])


# ---------------------------------------------------------------------- states


def delivered_exports(sessions: sessionmaker[Session], count: int) -> list[int]:
    """``count`` exports to ``TARGET``, delivered."""
    with sessions.begin() as session:
        ids = []
        for number in range(count):
            session.add(
                Export(
                    destination=TARGET.name,
                    host=TARGET.host,
                    port=TARGET.port,
                    ae_title=TARGET.ae_title,
                    sop_instance_uid=f"1.2.3.{number + 1}",
                    sop_class_uid=CT,
                    path=f"/outputs/{number + 1}.dcm",
                    state=ExportState.DELIVERED,
                    attempts=1,
                    max_attempts=TARGET.max_attempts,
                    next_attempt_at=T0,
                    delivered_at=T0,
                )
            )
        session.flush()
        ids = list(session.scalars(select(Export.id).order_by(Export.id)))
    return ids


class Asked:
    """A PACS that takes every N-ACTION (or refuses with ``error``), remembering each."""

    def __init__(self, error: str | None = None) -> None:
        self.datasets: list[Dataset] = []
        self.error = error

    def __call__(self, target: ExportTarget, dataset: Dataset) -> str | None:
        self.datasets.append(dataset)
        return self.error


def audit_outcomes(sessions: sessionmaker[Session]) -> list[tuple[int | None, AuditOutcome]]:
    with sessions() as session:
        return [
            (int(event.object_id) if event.object_id else None, event.outcome)
            for event in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == AuditAction.STORAGE_COMMITMENT)
                .order_by(AuditEvent.id)
            )
        ]


def test_delivered_exports_are_asked_about_once_then_committed_or_sent_again(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ids = delivered_exports(sessions, 3)
    pending = PendingTransactions.under(tmp_path)
    ask = Asked()
    result = request_due(sessions, [TARGET], pending, now=T0, ask=ask)
    [(transaction_uid, asked)] = result.asked.items()
    assert asked == ids and transaction_uid in pending
    [dataset] = ask.datasets
    assert dataset.TransactionUID == transaction_uid
    assert [i.ReferencedSOPInstanceUID for i in dataset.ReferencedSOPSequence] == [
        "1.2.3.1",
        "1.2.3.2",
        "1.2.3.3",
    ]
    # Asked already and not timed out: not asked again.
    assert (
        request_due(sessions, [TARGET], pending, now=T0 + dt.timedelta(seconds=30), ask=ask).asked
        == {}
    )

    report = CommitmentReported(
        transaction_uid,
        "PACS",
        (CommittedInstance(CT, "1.2.3.1"),),
        (FailedInstance(CT, "1.2.3.2", 0x0112),),
        T0 + dt.timedelta(seconds=5),
    )
    with sessions.begin() as session:
        states = apply_report(session, report)
    assert states == {ids[0]: ExportState.COMMITTED, ids[1]: ExportState.PENDING}
    first, second, third = rows(sessions)
    assert first.state == ExportState.COMMITTED and first.committed_at is not None
    assert second.state == ExportState.PENDING and second.attempts == 1
    assert second.commitment_uid is None and second.commitment_requests == 0
    assert second.last_error == "not committed by the PACS: 0x0112 (no such object instance)"
    assert third.state == ExportState.DELIVERED and third.commitment_uid == transaction_uid
    assert audit_outcomes(sessions) == [
        (ids[0], AuditOutcome.SUCCESS),
        (ids[1], AuditOutcome.RETRYING),
    ]
    # The third still waits on the transaction: its marker stays until it is answered.
    request_due(sessions, [TARGET], pending, now=T0 + dt.timedelta(seconds=31), ask=ask)
    assert transaction_uid in pending


def test_a_failure_reported_on_the_last_attempt_fails_the_export(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    [export_id] = delivered_exports(sessions, 1)
    with sessions.begin() as session:
        session.get_one(Export, export_id).attempts = TARGET.max_attempts
    result = request_due(
        sessions, [TARGET], PendingTransactions.under(tmp_path), now=T0, ask=Asked()
    )
    [transaction_uid] = result.asked
    report = CommitmentReported(
        transaction_uid, "PACS", (), (FailedInstance(CT, "1.2.3.1", 0x0119),), T0
    )
    with sessions.begin() as session:
        assert apply_report(session, report) == {export_id: ExportState.FAILED}
    [row] = rows(sessions)
    assert row.last_error == "not committed by the PACS: 0x0119 (class/instance conflict)"
    assert audit_outcomes(sessions) == [(export_id, AuditOutcome.FAILURE)]


def test_an_unanswered_request_is_asked_again_then_given_up_with_the_reason(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    [export_id] = delivered_exports(sessions, 1)
    pending = PendingTransactions.under(tmp_path)
    ask = Asked()
    first = request_due(sessions, [TARGET], pending, now=T0, ask=ask)
    later = T0 + dt.timedelta(seconds=TARGET.commitment_timeout)
    second = request_due(sessions, [TARGET], pending, now=later, ask=ask)
    [first_uid], [second_uid] = first.asked, second.asked
    assert first_uid != second_uid
    assert pending.listed() == [second_uid]  # a late answer to the first is refused
    [row] = rows(sessions)
    assert row.commitment_requests == 2 and row.state == ExportState.DELIVERED
    # A late report under the first UID changes nothing.
    late = CommitmentReported(first_uid, "PACS", (CommittedInstance(CT, "1.2.3.1"),), (), later)
    with sessions.begin() as session:
        assert apply_report(session, late) == {}

    last = request_due(sessions, [TARGET], pending, now=later + dt.timedelta(seconds=60), ask=ask)
    assert last.given_up == [export_id] and last.asked == {}
    [row] = rows(sessions)
    assert row.state == ExportState.FAILED
    assert row.last_error == "storage commitment never answered: asked 2 times, 60 s each"
    assert pending.listed() == []
    assert audit_outcomes(sessions) == [(export_id, AuditOutcome.FAILURE)]
    assert len(ask.datasets) == 2
    # Retried by hand (or replayed): sent and asked about afresh.
    with sessions.begin() as session:
        retry(session, export_id)
    [row] = rows(sessions)
    assert row.state == ExportState.PENDING and row.commitment_requests == 0


def test_a_refused_request_is_recorded_and_asked_again_after_the_timeout(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    delivered_exports(sessions, 1)
    pending = PendingTransactions.under(tmp_path)
    result = request_due(sessions, [TARGET], pending, now=T0, ask=Asked("no association"))
    assert list(result.errors.values()) == ["no association"]
    [row] = rows(sessions)
    assert row.last_error == "storage commitment request failed: no association"
    assert row.state == ExportState.DELIVERED and row.commitment_requests == 1


def test_destinations_without_storage_commitment_are_never_asked(
    sessions: sessionmaker[Session], tmp_path: Path, series_files: list[Path]
) -> None:
    plain = ExportTarget("pacs", "127.0.0.1", 104, "PACS")
    with sessions.begin() as session:
        enqueue(session, plain, series_files[:1], now=T0)
        session.execute(Export.__table__.update().values(state=ExportState.DELIVERED))
    ask = Asked()
    assert (
        request_due(sessions, [plain], PendingTransactions.under(tmp_path), now=T0, ask=ask).asked
        == {}
    )
    assert ask.datasets == []
