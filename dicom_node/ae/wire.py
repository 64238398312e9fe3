"""The DICOM upper layer on the wire (PS3.8 9.3): reading PDUs from a socket, within bounds.

A peer may lie about lengths, stall, or send garbage. Every PDU is read against a
deadline (``network_timeout`` for the whole PDU, not per byte, so a peer dripping one
byte at a time is dropped too), a P-DATA-TF may not be longer than the maximum length
the node announced, and an A-ASSOCIATE-RQ is capped; nothing is allocated before its
length has passed those checks.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from processors.errors import BadInputError


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class AbortReason(IntEnum):
    """A-ABORT provider reasons (PS3.8 9.3.8), sent with source 2 (service provider)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNISED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNISED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER_VALUE = 0x06


MAX_ASSOCIATE_RQ_BYTES = 1 << 20
"""An A-ASSOCIATE-RQ proposes at most 128 contexts; 1 MiB is far more than any needs."""

_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")

RELEASE_RP = struct.pack(">BxI4x", PduType.RELEASE_RP, 4)


class ProtocolError(BadInputError):
    """The peer broke the protocol; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: AbortReason = AbortReason.NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class PeerGoneError(BadInputError):
    """The peer closed the connection or stopped sending within the timeout."""


def abort_pdu(reason: AbortReason, source: int = 0x02) -> bytes:
    return struct.pack(">BxI2xBB", PduType.ABORT, 4, source, reason)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return struct.pack(">BxIxBBB", PduType.ASSOCIATE_RJ, 4, result, source, diagnostic)


def p_data_pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF with one PDV (``control``: bit 0 command, bit 1 last fragment)."""
    item_length = len(fragment) + 2
    return (
        _HEADER.pack(PduType.P_DATA_TF, item_length + 4)
        + _PDV_HEADER.pack(item_length, context_id, control)
        + fragment
    )


@dataclass(frozen=True)
class Pdv:
    context_id: int
    is_command: bool
    is_last: bool
    data: memoryview


def iter_pdvs(body: memoryview) -> Iterator[Pdv]:
    """The presentation data values of a P-DATA-TF body, checked against its length."""
    offset, end = 0, len(body)
    if end == 0:
        raise ProtocolError("P-DATA-TF without a PDV", AbortReason.INVALID_PDU_PARAMETER_VALUE)
    while offset < end:
        if end - offset < _PDV_HEADER.size:
            raise ProtocolError("truncated PDV header", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        item_length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        if item_length < 2 or offset + 4 + item_length > end:
            raise ProtocolError(
                "PDV length beyond its P-DATA-TF", AbortReason.INVALID_PDU_PARAMETER_VALUE
            )
        start = offset + _PDV_HEADER.size
        offset += 4 + item_length
        yield Pdv(context_id, bool(control & 0x01), bool(control & 0x02), body[start:offset])


class PduReader:
    """Reads whole PDUs from a connected socket, each within ``timeout`` seconds."""

    def __init__(self, connection: socket.socket, timeout: float, max_p_data_length: int) -> None:
        self.connection = connection
        self.timeout = timeout
        self.max_p_data_length = max_p_data_length
        self._header = bytearray(_HEADER.size)
        self._body = bytearray()

    def read(self, timeout: float | None = None) -> tuple[PduType, memoryview]:
        """The next PDU's type and body. The body is valid until the next call."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._read_into(memoryview(self._header), deadline, first=True)
        pdu_type, length = _HEADER.unpack(self._header)
        try:
            kind = PduType(pdu_type)
        except ValueError:
            raise ProtocolError(
                f"unrecognised PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNISED_PDU
            ) from None
        limit = self._limit(kind)
        if length > limit:
            raise ProtocolError(
                f"{kind.name} of {length} bytes exceeds the {limit} announced",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        if length > len(self._body):  # grows to the longest PDU the peer sent, once
            self._body = bytearray(length)
        body = memoryview(self._body)[:length]
        self._read_into(body, deadline, first=False)
        return kind, body

    def _limit(self, kind: PduType) -> int:
        if kind is PduType.P_DATA_TF:
            return self.max_p_data_length
        if kind in (PduType.ASSOCIATE_RQ, PduType.ASSOCIATE_AC):
            return MAX_ASSOCIATE_RQ_BYTES
        return 64

    def _read_into(self, view: memoryview, deadline: float, *, first: bool) -> None:
        received = 0
        while received < len(view):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerGoneError("the peer stopped sending within the timeout")
            self.connection.settimeout(remaining)
            try:
                count = self.connection.recv_into(view[received:])
            except TimeoutError:
                raise PeerGoneError("the peer stopped sending within the timeout") from None
            except OSError as exc:
                raise PeerGoneError(f"connection lost: {exc.strerror or exc}") from None
            if count == 0:
                where = "between PDUs" if first and received == 0 else "inside a PDU"
                raise PeerGoneError(f"the peer closed the connection {where}")
            received += count
