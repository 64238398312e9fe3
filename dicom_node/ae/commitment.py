"""Storage Commitment Push Model (PS3.4 Annex J): the datasets, both ways, and the node's
side of the N-EVENT-REPORT, with no database code (receiver processes import this).

The exporter asks a PACS to commit what it delivered with an N-ACTION (Action Type 1)
whose dataset names a Transaction UID and the Referenced SOP Sequence
(``action_information``). The PACS answers later with an N-EVENT-REPORT (Event Type 1:
all committed; 2: some failed, in the Failed SOP Sequence with a Failure Reason), most
often on an association of its own to the node, as Orthanc does. The receiver checks the
report (``handle_event_report``): its SOP class and instance, its event type, its dataset,
and that its Transaction UID is one the node is waiting for (``PendingTransactions``, a
marker file per transaction under ``<data_dir>/commitment``, written by the exporter
before it asks), then passes it to the main process as a ``CommitmentReported`` record.
Anything else is answered with a failure status.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode

from dicom_node.dimse_status import DimseStatus
from dicom_node.records import CommitmentReported, CommittedInstance, FailedInstance
from processors.errors import BadInputError

log = structlog.get_logger(__name__)

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
"""The well-known SOP instance both the N-ACTION and the N-EVENT-REPORT address."""
REQUEST_COMMITMENT = 1
"""Action Type ID of "Request Storage Commitment"."""
ALL_COMMITTED = 1
SOME_FAILED = 2
"""Event Type IDs of the N-EVENT-REPORT: all instances committed, or some failed."""
MAX_EVENT_REPORT_BYTES = 16 * 1024 * 1024
"""A report's dataset longer than this is read past and refused (a reference is ~130 bytes)."""

FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
"""PS3.3 C.14.1.1's Failure Reasons, in words."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

Outcome = tuple[int, str | None]


class MalformedReportError(BadInputError):
    """The N-EVENT-REPORT's dataset is not a storage commitment result."""


def is_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def describe_failure(reason: int | None) -> str:
    if reason is None:
        return "no failure reason given"
    return f"0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown reason')})"


def action_information(transaction_uid: str, instances: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION-RQ's dataset: the Transaction UID and a Referenced SOP Sequence item per
    (SOP class UID, SOP instance UID)."""
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    references = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        references.append(item)
    dataset.ReferencedSOPSequence = references
    return dataset


def _references(dataset: Dataset, keyword: str) -> list[Dataset]:
    if keyword not in dataset:
        return []
    items = dataset[keyword].value
    if not isinstance(items, Sequence):
        raise MalformedReportError(f"{keyword} is not a sequence")
    return list(items)


def _reference_uids(item: Dataset, keyword: str) -> tuple[str, str]:
    sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
    sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
    if not (is_uid(sop_class) and is_uid(sop_instance)):
        raise MalformedReportError(f"an item of {keyword} without valid SOP class/instance UIDs")
    return sop_class, sop_instance


def parse_event_information(
    dataset: Dataset, event_type: int, *, calling_ae_title: str = ""
) -> CommitmentReported:
    """The result an N-EVENT-REPORT's dataset gives; ``MalformedReportError`` when it is
    not one (no or an invalid Transaction UID, references without valid UIDs, a Failure
    Reason that is not a number, an event type that contradicts its sequences)."""
    try:
        transaction_uid = str(dataset.get("TransactionUID", "") or "")
        committed = [
            CommittedInstance(*_reference_uids(item, "ReferencedSOPSequence"))
            for item in _references(dataset, "ReferencedSOPSequence")
        ]
        failed = []
        for item in _references(dataset, "FailedSOPSequence"):
            reason = item.get("FailureReason")
            if reason is not None and not isinstance(reason, int):
                raise MalformedReportError("a Failure Reason that is not a number")
            failed.append(FailedInstance(*_reference_uids(item, "FailedSOPSequence"), reason))
    except MalformedReportError:
        raise
    except Exception as exc:  # pydicom decodes lazily: a bad value surfaces here
        raise MalformedReportError(f"unreadable event information ({type(exc).__name__})") from exc
    if not is_uid(transaction_uid):
        raise MalformedReportError("no valid Transaction UID")
    if event_type == ALL_COMMITTED and failed:
        raise MalformedReportError("event type 1 (all committed) with a Failed SOP Sequence")
    if event_type == SOME_FAILED and not failed:
        raise MalformedReportError("event type 2 (failures) without a Failed SOP Sequence")
    return CommitmentReported(
        transaction_uid=transaction_uid,
        calling_ae_title=calling_ae_title,
        committed=tuple(committed),
        failed=tuple(failed),
        received_at=dt.datetime.now(dt.UTC),
    )


def decode_data_set(data: bytes, transfer_syntax: str) -> Dataset:
    """A DIMSE message's dataset in its presentation context's transfer syntax."""
    dataset = decode(
        BytesIO(data),
        is_implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
        is_little_endian=transfer_syntax != ExplicitVRBigEndian,
        deflated=transfer_syntax == DeflatedExplicitVRLittleEndian,
    )
    return dataset


class PendingTransactions:
    """The transactions the node waits for a report of: a marker file each, named by its
    Transaction UID, in a folder the exporter and the receivers share (``<data_dir>/
    commitment``; on a data folder shared by several nodes, any of them may take a report).
    The exporter adds one before it asks and removes it when no export waits on it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def under(cls, data_dir: Path) -> PendingTransactions:
        return cls(data_dir / "commitment")

    def _path(self, transaction_uid: str) -> Path:
        if not is_uid(transaction_uid):  # never a path made of what a peer sent
            raise ValueError("not a UID")
        return self.folder / transaction_uid

    def add(self, transaction_uid: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(transaction_uid)
        with path.open("wb") as marker:
            os.fsync(marker.fileno())

    def __contains__(self, transaction_uid: object) -> bool:
        return is_uid(transaction_uid) and self._path(str(transaction_uid)).exists()

    def remove(self, transaction_uid: str) -> None:
        with contextlib.suppress(ValueError):
            self._path(transaction_uid).unlink(missing_ok=True)

    def listed(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return [path.name for path in self.folder.iterdir() if is_uid(path.name)]


def check_event_report(
    sop_class_uid: str,
    sop_instance_uid: str,
    event_type: int | None,
    data: bytes | None,
    transfer_syntax: str,
    pending: PendingTransactions,
    calling_ae_title: str,
) -> tuple[Outcome, CommitmentReported | None]:
    """The status to answer an N-EVENT-REPORT-RQ with, and the result to pass on (only
    when the status is success). ``data`` is its dataset (``None``: there was none, or
    it was longer than ``MAX_EVENT_REPORT_BYTES``)."""
    if sop_class_uid != STORAGE_COMMITMENT_PUSH_MODEL:
        return (DimseStatus.NO_SUCH_SOP_CLASS, "Only storage commitment reports are taken"), None
    if sop_instance_uid != STORAGE_COMMITMENT_INSTANCE:
        return (DimseStatus.INVALID_OBJECT_INSTANCE, "Not the storage commitment instance"), None
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        return (DimseStatus.NO_SUCH_EVENT_TYPE, "Event Type must be 1 or 2"), None
    if data is None:
        return (DimseStatus.NO_SUCH_ARGUMENT, "No (or an oversized) event information"), None
    try:
        report = parse_event_information(
            decode_data_set(data, transfer_syntax), event_type, calling_ae_title=calling_ae_title
        )
    except MalformedReportError as exc:
        log.warning("storage commitment report refused", peer=calling_ae_title, reason=str(exc))
        return (DimseStatus.INVALID_ARGUMENT_VALUE, str(exc)), None
    except Exception as exc:  # not a dataset at all
        log.warning("storage commitment report unreadable", peer=calling_ae_title, error=str(exc))
        return (DimseStatus.INVALID_ARGUMENT_VALUE, "Event information is not a dataset"), None
    if report.transaction_uid not in pending:
        log.warning(
            "storage commitment report for an unknown transaction",
            peer=calling_ae_title,
            transaction_uid=report.transaction_uid,
        )
        return (DimseStatus.INVALID_ARGUMENT_VALUE, "Unknown Transaction UID"), None
    log.info(
        "storage commitment report",
        peer=calling_ae_title,
        transaction_uid=report.transaction_uid,
        committed=len(report.committed),
        failed=len(report.failed),
    )
    return (DimseStatus.SUCCESS, None), report
