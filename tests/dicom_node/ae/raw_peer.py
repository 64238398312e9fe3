"""A DICOM peer on a raw socket, for tests that send what no well-behaved SCU would.

Every PDU is built here with ``struct`` (PS3.8 section 9.3) so that a test controls each
length field, and nothing depends on the node's own DICOM library.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.dsutils import split_dataset

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

COMMAND_FRAGMENT, COMMAND_LAST = 0x01, 0x03
DATA_FRAGMENT, DATA_LAST = 0x00, 0x02

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
SENDER_MAX_PDU = 16384
LARGEST_PDU_READ = 16 * 1024 * 1024  # what this test peer accepts from the node

_C_STORE_RQ, _C_ECHO_RQ = 0x0001, 0x0030
_NO_DATA_SET, _DATA_SET_PRESENT = 0x0101, 0x0000


class PeerClosedError(ConnectionError):
    """The node closed the connection while this peer expected a PDU."""


def dataset_after_file_meta(path: Path) -> bytes:
    """A DICOM file's data set as encoded, without the preamble and file meta group."""
    _, offset = split_dataset(path)
    with path.open("rb") as stream:
        stream.seek(offset)
        return stream.read()


def _uid(value: str) -> bytes:
    raw = value.encode("latin-1")  # a hostile peer may send any byte
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes, *, claimed_length: int | None = None) -> bytes:
    """A PDU; ``claimed_length`` puts a different length than the body's in its header."""
    length = len(body) if claimed_length is None else claimed_length
    return struct.pack(">BBI", pdu_type, 0, length) + body


def associate_rq(
    contexts: list[tuple[str, list[str]]],
    *,
    calling_ae: str = "HOSTILE",
    called_ae: str = "DICOMNODE",
    max_pdu: int = SENDER_MAX_PDU,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``(abstract syntax, transfer syntaxes)`` as contexts
    1, 3, 5, ..."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for index, (abstract_syntax, transfer_syntaxes) in enumerate(contexts):
        sub_items = _item(0x30, _uid(abstract_syntax)) + b"".join(
            _item(0x40, _uid(syntax)) for syntax in transfer_syntaxes
        )
        items += _item(0x20, struct.pack(">BBBB", 2 * index + 1, 0, 0, 0) + sub_items)
    user_information = _item(0x51, struct.pack(">I", max_pdu)) + _item(
        0x52, _uid("1.2.826.0.1.3680043.10.1433.99")
    )
    items += _item(0x50, user_information)
    header = struct.pack(
        ">HH16s16s32s",
        1,
        0,
        called_ae.ljust(16).encode(),
        calling_ae.ljust(16).encode(),
        b"",
    )
    return pdu(A_ASSOCIATE_RQ, header + items)


def p_data_tf(pdvs: list[tuple[int, int, bytes]], *, claimed_length: int | None = None) -> bytes:
    """A P-DATA-TF of ``(presentation context ID, message control header, data)`` items."""
    body = b"".join(
        struct.pack(">IBB", len(data) + 2, context_id, control) + data
        for context_id, control, data in pdvs
    )
    return pdu(P_DATA_TF, body, claimed_length=claimed_length)


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def command_set(
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str | None = None,
) -> bytes:
    """A DIMSE request's command set, implicit VR little endian (PS3.7 section 9.3)."""
    has_data_set = command_field == _C_STORE_RQ
    elements = _command_element(0x0002, _uid(sop_class_uid))
    elements += _command_element(0x0100, struct.pack("<H", command_field))
    elements += _command_element(0x0110, struct.pack("<H", message_id))
    if has_data_set:
        elements += _command_element(0x0700, struct.pack("<H", 0))  # medium priority
    elements += _command_element(
        0x0800, struct.pack("<H", _DATA_SET_PRESENT if has_data_set else _NO_DATA_SET)
    )
    if sop_instance_uid is not None:
        elements += _command_element(0x1000, _uid(sop_instance_uid))
    return _command_element(0x0000, struct.pack("<I", len(elements))) + elements


def command_status(encoded: bytes) -> int:
    """The Status (0000,0900) of a response's command set."""
    offset = 0
    while offset + 8 <= len(encoded):
        group, element, length = struct.unpack_from("<HHI", encoded, offset)
        if (group, element) == (0x0000, 0x0900):
            return int(struct.unpack_from("<H", encoded, offset + 8)[0])
        offset += 8 + length
    raise AssertionError(f"no Status in the response's command set {encoded.hex()}")


def store_pdus(
    context_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    data_set: bytes,
    *,
    message_id: int = 1,
    max_pdu: int = SENDER_MAX_PDU,
) -> list[bytes]:
    """A C-STORE-RQ as the P-DATA-TF PDUs a well-behaved SCU sends: the command set, then
    the data set in fragments that fit ``max_pdu``."""
    command = command_set(_C_STORE_RQ, message_id, sop_class_uid, sop_instance_uid)
    pdus = [p_data_tf([(context_id, COMMAND_LAST, command)])]
    fragment = max_pdu - 6
    for start in range(0, len(data_set), fragment):
        last = start + fragment >= len(data_set)
        control = DATA_LAST if last else DATA_FRAGMENT
        pdus.append(p_data_tf([(context_id, control, data_set[start : start + fragment])]))
    return pdus


def iter_pdv_items(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    while offset < len(body):
        length, context_id, control = struct.unpack_from(">IBB", body, offset)
        yield context_id, control, body[offset + 6 : offset + 4 + length]
        offset += 4 + length


@dataclass
class Accepted:
    """What the node's A-ASSOCIATE-AC said: accepted context IDs and their transfer
    syntaxes, and the largest P-DATA-TF it takes (0: no limit)."""

    contexts: dict[int, str]
    max_pdu: int


def parse_associate_ac(body: bytes) -> Accepted:
    contexts: dict[int, str] = {}
    max_pdu = 0
    offset = 68  # protocol version, reserved, called and calling AE titles, reserved
    while offset < len(body):
        item_type, _, length = struct.unpack_from(">BBH", body, offset)
        value = body[offset + 4 : offset + 4 + length]
        if item_type == 0x21 and value[2] == 0:  # presentation context, accepted
            syntax_length = struct.unpack_from(">H", value, 6)[0]
            contexts[value[0]] = value[8 : 8 + syntax_length].rstrip(b"\x00").decode()
        elif item_type == 0x50:
            sub_offset = 0
            while sub_offset < len(value):
                sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub_offset)
                if sub_type == 0x51:
                    max_pdu = struct.unpack_from(">I", value, sub_offset + 4)[0]
                sub_offset += 4 + sub_length
        offset += 4 + length
    return Accepted(contexts, max_pdu)


class RawPeer:
    """One TCP connection to the node, driven PDU by PDU."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_unless_closed(self, data: bytes) -> None:
        """Send what the node may refuse part way: it may abort and close meanwhile."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def _read_exactly(self, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = self.sock.recv(min(count - len(chunks), 65536))
            if not chunk:
                raise PeerClosedError(f"connection closed after {len(chunks)} of {count} bytes")
            chunks += chunk
        return bytes(chunks)

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBI", self._read_exactly(6))
        assert length <= LARGEST_PDU_READ, f"the node sent a PDU of {length} bytes"
        return pdu_type, self._read_exactly(length)

    def associate(self, contexts: list[tuple[str, list[str]]], **kwargs: object) -> Accepted:
        self.send(associate_rq(contexts, **kwargs))  # type: ignore[arg-type]
        pdu_type, body = self.read_pdu()
        assert pdu_type == A_ASSOCIATE_AC, f"expected an A-ASSOCIATE-AC, got PDU type {pdu_type}"
        return parse_associate_ac(body)

    def read_response_status(self) -> int:
        command = b""
        while True:
            pdu_type, body = self.read_pdu()
            assert pdu_type == P_DATA_TF, f"expected a P-DATA-TF, got PDU type {pdu_type}"
            for _, control, data in iter_pdv_items(body):
                command += data
                if control == COMMAND_LAST:
                    return command_status(command)

    def store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        data_set: bytes,
        message_id: int = 1,
    ) -> int:
        for encoded in store_pdus(
            context_id, sop_class_uid, sop_instance_uid, data_set, message_id=message_id
        ):
            self.send(encoded)
        return self.read_response_status()

    def echo(self, context_id: int, message_id: int = 1) -> int:
        command = command_set(_C_ECHO_RQ, message_id, VERIFICATION)
        self.send(p_data_tf([(context_id, COMMAND_LAST, command)]))
        return self.read_response_status()

    def release(self) -> None:
        self.send(pdu(A_RELEASE_RQ, b"\x00" * 4))
        pdu_type, _ = self.read_pdu()
        assert pdu_type == A_RELEASE_RP, f"expected an A-RELEASE-RP, got PDU type {pdu_type}"

    def wait_closed(self, timeout: float) -> bytes:
        """Everything the node sends until it closes the connection (a reset counts as
        closed); fails the test if it is still open after ``timeout`` seconds."""
        received = bytearray()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(received)
            except TimeoutError:
                break
            if not chunk:
                return bytes(received)
            received += chunk
        raise AssertionError(
            f"the node kept the connection open for {timeout} s"
            f" (it sent PDU types {pdu_types(bytes(received))})"
        )


def pdu_types(stream: bytes) -> list[int]:
    """The types of the PDUs in ``stream``, the last one possibly cut short."""
    types = []
    offset = 0
    while offset + 6 <= len(stream):
        pdu_type, _, length = struct.unpack_from(">BBI", stream, offset)
        types.append(pdu_type)
        offset += 6 + length
    return types


def peak_virtual_memory_kib() -> int:
    """This process's peak virtual memory (the node runs in it): a buffer allocated for a
    claimed length raises it even if its pages are never touched."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1])
    raise AssertionError("no VmPeak in /proc/self/status")
