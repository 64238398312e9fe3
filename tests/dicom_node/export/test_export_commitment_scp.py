"""Storage commitment against a fake PACS (pynetdicom): it takes C-STOREs and N-ACTIONs
and reports, or never does, on an association of its own to the node as the SCP (role
selection), the way Orthanc does. The node answers every bad report with a failure status
and keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from db.models import ExportState
from dicom_node.ae.commitment import STORAGE_COMMITMENT_INSTANCE
from dicom_node.config import Settings
from dicom_node.dimse_status import DimseStatus
from dicom_node.export.queue import enqueue
from dicom_node.export.target import export_target
from dicom_node.node import Node
from dicom_node.testing import free_port, local_settings
from tests.dicom_node.export.export_support import exports_of, running, uid_of, wait_for

NODE_AE = "COMMITNODE"
Script = Callable[["FakePacs", Dataset], None]
"""What the fake PACS does after it answered an N-ACTION (on a thread of its own)."""


class FakePacs:
    """A storage SCP and storage commitment SCP; ``script`` decides what it reports."""

    def __init__(self, node_port: int, script: Script) -> None:
        self.node_port = node_port
        self.script = script
        self.port = free_port()
        self.stored: list[str] = []
        self.requests: list[Dataset] = []
        self.report_statuses: list[int] = []
        ae = AE(ae_title="FAKEPACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(StorageCommitmentPushModel)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)],
        )
        self._threads: list[threading.Thread] = []

    def _store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        self.requests.append(request)
        thread = threading.Thread(target=self.script, args=(self, request), daemon=True)
        self._threads.append(thread)
        thread.start()
        return 0x0000, None

    def report(self, event_type: int, dataset: Dataset) -> int:
        """Send one N-EVENT-REPORT to the node as the storage commitment SCP; its status."""
        ae = AE(ae_title="FAKEPACS")
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = ae.associate("127.0.0.1", self.node_port, ae_title=NODE_AE, ext_neg=[role])
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_event_report(
                dataset, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
        finally:
            assoc.release()
        self.report_statuses.append(int(status.Status))
        return int(status.Status)

    def stop(self) -> None:
        self._server.shutdown()
        for thread in self._threads:
            thread.join(30)


@contextmanager
def node_and_fake_pacs(
    tmp_path: Path, script: Script, **destination: object
) -> Iterator[tuple[Node, Settings, FakePacs]]:
    node_port = free_port()
    pacs = FakePacs(node_port, script)
    settings = local_settings(
        tmp_path,
        port=node_port,
        ae_title=NODE_AE,
        destinations=[
            {
                "name": "pacs",
                "host": "127.0.0.1",
                "port": pacs.port,
                "ae_title": "FAKEPACS",
                "storage_commitment": True,
                "timeout": 10.0,
                **destination,
            }
        ],
    )
    try:
        with running(settings) as node:
            yield node, settings, pacs
    finally:
        pacs.stop()


def send(node: Node, settings: Settings, files: list[Path]) -> None:
    assert node.sessions is not None and node.exporter is not None
    with node.sessions.begin() as session:
        enqueue(session, export_target(settings.destinations[0], settings.ae_title), files)
    node.exporter.wake()


def references(request: Dataset) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in request.ReferencedSOPSequence]


def result(transaction_uid: str, committed: list[str], failed: list[str]) -> Dataset:
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    if committed:
        dataset.ReferencedSOPSequence = [item(uid) for uid in committed]
    if failed:
        dataset.FailedSOPSequence = [item(uid, failure_reason=0x0112) for uid in failed]
    return dataset


def item(sop_instance_uid: str, failure_reason: int | None = None) -> Dataset:
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = sop_instance_uid
    if failure_reason is not None:
        reference.FailureReason = failure_reason
    return reference


def never_answer(pacs: FakePacs, request: Dataset) -> None:
    return


def test_an_unanswered_commitment_is_asked_again_then_fails_with_the_reason(
    tmp_path: Path, series_files: list[Path]
) -> None:
    with node_and_fake_pacs(
        tmp_path, never_answer, commitment_timeout=1.0, commitment_requests=2
    ) as (node, settings, pacs):
        send(node, settings, series_files[:2])
        wait_for(
            "the exports to fail",
            lambda: all(row.state == ExportState.FAILED for row in exports_of(node)),
        )
        final = exports_of(node)
    assert [row.last_error for row in final] == [
        "storage commitment never answered: asked 2 times, 1 s each"
    ] * 2
    first, second = pacs.requests
    assert first.TransactionUID != second.TransactionUID
    assert references(first) == references(second) == [uid_of(p) for p in series_files[:2]]
    assert sorted(pacs.stored) == sorted(uid_of(p) for p in series_files[:2])  # sent once


def bad_reports_then_one_failure(pacs: FakePacs, request: Dataset) -> None:
    """To the first request: bad reports, then one instance failed and the rest committed.
    To the next: all committed."""
    uids = references(request)
    transaction = str(request.TransactionUID)
    if len(pacs.requests) > 1:
        pacs.report(1, result(transaction, uids, []))
        return
    pacs.report(1, result("2.25.424242", uids, []))  # a transaction the node never asked
    pacs.report(3, result(transaction, uids, []))  # no such event type
    pacs.report(1, result(transaction, uids[1:], uids[:1]))  # type 1 with failures
    missing_uid = Dataset()
    missing_uid.TransactionUID = transaction
    missing_uid.ReferencedSOPSequence = [Dataset()]
    pacs.report(1, missing_uid)  # a reference without its UIDs
    pacs.report(2, result(transaction, uids[1:], uids[:1]))


def test_bad_reports_get_failure_statuses_and_a_reported_failure_is_sent_again(
    tmp_path: Path, series_files: list[Path]
) -> None:
    files = series_files[:3]
    with node_and_fake_pacs(tmp_path, bad_reports_then_one_failure) as (node, settings, pacs):
        send(node, settings, files)
        wait_for(
            "every export committed",
            lambda: all(row.state == ExportState.COMMITTED for row in exports_of(node)),
        )
        final = exports_of(node)
    assert pacs.report_statuses == [
        DimseStatus.INVALID_ARGUMENT_VALUE,
        DimseStatus.NO_SUCH_EVENT_TYPE,
        DimseStatus.INVALID_ARGUMENT_VALUE,
        DimseStatus.INVALID_ARGUMENT_VALUE,
        DimseStatus.SUCCESS,
        DimseStatus.SUCCESS,
    ]
    lost = uid_of(files[0])
    assert [references(request) for request in pacs.requests] == [
        [uid_of(p) for p in files],
        [lost],
    ]
    assert sorted(pacs.stored) == sorted([lost, *(uid_of(p) for p in files)])
    assert [(row.sop_instance_uid, row.attempts) for row in final] == [
        (lost, 2),
        *((uid_of(p), 1) for p in files[1:]),
    ]
