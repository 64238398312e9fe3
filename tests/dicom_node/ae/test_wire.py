"""PDUs read within bounds: lengths checked before anything is allocated, a deadline per PDU."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, P_DATA_TF

from dicom_node.ae.wire import (
    AbortReason,
    PduReader,
    PduType,
    PeerGoneError,
    ProtocolError,
    abort_pdu,
    iter_pdvs,
    p_data_pdu,
    reject_pdu,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def test_a_pdu_split_over_many_sends_is_read_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    pdu = p_data_pdu(1, 0x02, b"x" * 1000)
    for start in range(0, len(pdu), 7):
        theirs.sendall(pdu[start : start + 7])
    kind, body = PduReader(ours, 5.0, 4096).read()
    assert kind is PduType.P_DATA_TF
    [pdv] = list(iter_pdvs(body))
    assert (pdv.context_id, pdv.is_command, pdv.is_last) == (1, False, True)
    assert bytes(pdv.data) == b"x" * 1000


def test_our_p_data_tf_decodes_with_pynetdicom() -> None:
    decoded = P_DATA_TF()
    decoded.decode(p_data_pdu(3, 0x03, b"abcd"))
    assert decoded.presentation_data_value_items[0].presentation_context_id == 3
    assert decoded.presentation_data_value_items[0].presentation_data_value == b"\x03abcd"


def test_abort_and_reject_decode_with_pynetdicom() -> None:
    abort = A_ABORT_RQ()
    abort.decode(abort_pdu(AbortReason.UNEXPECTED_PDU))
    assert (abort.source, abort.reason_diagnostic) == (2, 2)
    reject = A_ASSOCIATE_RJ()
    reject.decode(reject_pdu(1, 1, 3))
    assert (reject.result, reject.source, reject.reason_diagnostic) == (1, 1, 3)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (struct.pack(">BxI", 0x04, 0xFFFFFFF0), AbortReason.INVALID_PDU_PARAMETER_VALUE),
        (struct.pack(">BxI", 0x04, 4097), AbortReason.INVALID_PDU_PARAMETER_VALUE),
        (struct.pack(">BxI", 0x01, 1 << 24), AbortReason.INVALID_PDU_PARAMETER_VALUE),
        (struct.pack(">BxI", 0x05, 1 << 20), AbortReason.INVALID_PDU_PARAMETER_VALUE),
        (struct.pack(">BxI", 0x09, 4), AbortReason.UNRECOGNISED_PDU),
        (b"GET / HTTP/1.1\r\n", AbortReason.UNRECOGNISED_PDU),
    ],
)
def test_lengths_and_types_are_checked_before_reading_the_body(
    pair: tuple[socket.socket, socket.socket], header: bytes, reason: AbortReason
) -> None:
    ours, theirs = pair
    theirs.sendall(header)
    reader = PduReader(ours, 5.0, 4096)
    with pytest.raises(ProtocolError) as raised:
        reader.read()
    assert raised.value.reason == reason
    assert len(reader._body) == 0  # nothing allocated for the length it claimed


def test_a_peer_dripping_bytes_is_dropped_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    pdu = p_data_pdu(1, 0x02, b"x" * 100)
    stop = threading.Event()

    def drip() -> None:
        for byte in pdu:
            if stop.wait(0.1):
                return
            theirs.sendall(bytes([byte]))

    dripper = threading.Thread(target=drip)
    dripper.start()
    started = time.monotonic()
    try:
        with pytest.raises(PeerGoneError, match="timeout"):
            PduReader(ours, 0.5, 4096).read()
    finally:
        stop.set()
        dripper.join()
    assert time.monotonic() - started < 2.0


def test_a_peer_closing_mid_pdu_is_gone(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(p_data_pdu(1, 0x02, b"x" * 100)[:50])
    theirs.close()
    with pytest.raises(PeerGoneError, match="inside a PDU"):
        PduReader(ours, 5.0, 4096).read()


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no PDV
        b"\x00\x00\x00",  # truncated PDV header
        struct.pack(">IBB", 100, 1, 2) + b"short",  # PDV longer than the PDU
        struct.pack(">IBB", 1, 1, 2),  # PDV shorter than its own header
    ],
)
def test_malformed_pdvs_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(iter_pdvs(memoryview(body)))
