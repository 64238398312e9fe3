"""N-EVENT-REPORTs on the wire, byte by byte: a report that is not a dataset, one with no
dataset, one too long to keep, and one on a storage context each get a failure status,
and the association goes on serving."""

from __future__ import annotations

import struct

from dicom_node.ae.commitment import (
    MAX_EVENT_REPORT_BYTES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
)
from dicom_node.dimse_status import DimseStatus
from dicom_node.node import Node
from tests.dicom_node.ae.raw_peer import (
    COMMAND_LAST,
    CT_IMAGE_STORAGE,
    IMPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
    RawPeer,
    p_data_tf,
)

N_EVENT_REPORT_RQ = 0x0100
COMMITMENT_CONTEXT, STORAGE_CONTEXT, ECHO_CONTEXT = 1, 3, 5
DATA_LAST = 0x02


def element(number: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, number, len(value)) + value


def event_report(sop_class_uid: str, *, with_data_set: bool, message_id: int = 7) -> bytes:
    """An N-EVENT-REPORT-RQ's command set, Event Type 1."""
    elements = (
        element(0x0002, sop_class_uid.encode())
        + element(0x0100, struct.pack("<H", N_EVENT_REPORT_RQ))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0800, struct.pack("<H", 0x0000 if with_data_set else 0x0101))
        + element(0x1000, STORAGE_COMMITMENT_INSTANCE.encode())
        + element(0x1002, struct.pack("<H", 1))
    )
    return element(0x0000, struct.pack("<I", len(elements))) + elements


def report(peer: RawPeer, context_id: int, sop_class_uid: str, data_set: bytes | None) -> int:
    command = event_report(sop_class_uid, with_data_set=data_set is not None)
    peer.send(p_data_tf([(context_id, COMMAND_LAST, command)]))
    if data_set is not None:
        chunk = 15000
        for start in range(0, len(data_set), chunk):
            control = DATA_LAST if start + chunk >= len(data_set) else 0x00
            peer.send(p_data_tf([(context_id, control, data_set[start : start + chunk])]))
    return peer.read_response_status()


def test_bad_event_reports_on_the_wire_get_failure_statuses(node: Node) -> None:
    with RawPeer(node.settings.port) as peer:
        accepted = peer.associate(
            [
                (STORAGE_COMMITMENT_PUSH_MODEL, [IMPLICIT_VR_LITTLE_ENDIAN]),
                (CT_IMAGE_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN]),
                (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
            ],
            called_ae=node.settings.ae_title,
        )
        assert set(accepted.contexts) == {COMMITMENT_CONTEXT, STORAGE_CONTEXT, ECHO_CONTEXT}
        garbage = b"\xfe\xff\x00\xe0" + b"\xff" * 61
        commitment = (COMMITMENT_CONTEXT, STORAGE_COMMITMENT_PUSH_MODEL)
        assert report(peer, *commitment, garbage) == DimseStatus.INVALID_ARGUMENT_VALUE
        assert report(peer, *commitment, None) == DimseStatus.NO_SUCH_ARGUMENT
        too_long = bytes(MAX_EVENT_REPORT_BYTES + 2)
        assert report(peer, *commitment, too_long) == DimseStatus.NO_SUCH_ARGUMENT
        assert report(peer, STORAGE_CONTEXT, CT_IMAGE_STORAGE, garbage) == (
            DimseStatus.UNRECOGNISED_OPERATION
        )
        assert peer.echo(ECHO_CONTEXT) == DimseStatus.SUCCESS
        peer.release()
