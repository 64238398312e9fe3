"""Fuzz cases for the receive path: hypothesis strategies for hostile PDU sequences and
hostile data sets, and a runner that sends one case on a raw socket and checks that the
node is still whole afterwards.

Shared by ``test_fuzz.py`` (a bounded run in CI) and ``bench/fuzz.py`` (10,000 cases).
Every PDU and data element is built here with ``struct``: a case controls each length,
VR and UID, and nothing depends on the node's own DICOM code.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from tests.dicom_node.ae.raw_peer import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    COMMAND_LAST,
    CT_IMAGE_STORAGE,
    DATA_FRAGMENT,
    DATA_LAST,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    P_DATA_TF,
    VERIFICATION,
    RawPeer,
    associate_rq,
    command_set,
    command_status,
    iter_pdv_items,
    p_data_tf,
    pdu,
    pdu_types,
)

BIG_ENDIAN = "1.2.840.10008.1.2.2"
EXPLICIT_CONTEXT, IMPLICIT_CONTEXT, ECHO_CONTEXT = 1, 3, 5
CONTEXTS = [
    (CT_IMAGE_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN]),
    (CT_IMAGE_STORAGE, [IMPLICIT_VR_LITTLE_ENDIAN]),
    (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
]
C_STORE_RQ, C_ECHO_RQ, C_FIND_RQ = 0x0001, 0x0030, 0x0020
FRAGMENT = 8192
# A case waits this long for the node to answer and close after the peer stops sending.
CASE_TIMEOUT = 10.0

_LONG_LENGTH_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF


def element(group: int, number: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One data element, explicit VR little endian; ``length`` may lie about ``value``."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    claimed = len(value) if length is None else length
    if vr in _LONG_LENGTH_VRS or len(vr) != 2 or not vr.isalpha():
        return struct.pack("<HH2sHI", group, number, vr, 0, claimed) + value
    return struct.pack("<HH2sH", group, number, vr, claimed & 0xFFFF) + value


def nested_sequence(depth: int) -> bytes:
    """ReferencedSeriesSequence nested ``depth`` deep, undefined lengths all the way."""
    inner = element(0x0020, 0x000E, b"UI", b"1.2.3.4")
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED) + inner
        item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        inner = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, _UNDEFINED) + item
        inner += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return inner


@dataclass(frozen=True)
class HostileDataSet:
    """A C-STORE request whose data set may be anything."""

    sop_instance_uid: str  # what the command set says
    data_set: bytes
    context_id: int
    label: str  # what was done to it, for the counts

    def pdus(self, message_id: int = 1) -> list[bytes]:
        command = command_set(C_STORE_RQ, message_id, CT_IMAGE_STORAGE, self.sop_instance_uid)
        encoded = [p_data_tf([(self.context_id, COMMAND_LAST, command)])]
        for start in range(0, max(len(self.data_set), 1), FRAGMENT):
            last = start + FRAGMENT >= len(self.data_set)
            control = DATA_LAST if last else DATA_FRAGMENT
            chunk = self.data_set[start : start + FRAGMENT]
            encoded.append(p_data_tf([(self.context_id, control, chunk)]))
        return encoded


_uid_text = st.from_regex(r"\A[12]\.[0-9]{1,3}(\.[1-9][0-9]{0,8}){1,6}\Z", fullmatch=True)
HOSTILE_UIDS = st.one_of(
    _uid_text,
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "../../../../etc/passwd",
            "1.2.3/../../../x",
            "1.2.3\\4",
            "/tmp/evil",
            "1.2.3.4.",
            "1..2",
            "01.2.3",
            "1.2.3\x00.4",
            "1." * 40 + "1",
            "1.2." + "9" * 70,
            "spool",
            ".incoming",
        ]
    ),
    st.text(st.characters(codec="latin-1"), max_size=80),
)


@st.composite
def hostile_data_sets(draw: st.DrawFn) -> HostileDataSet:
    """A small CT data set with one thing done to it: hostile UIDs, a bad VR, a lying
    length, deep nesting, a truncation, flipped bytes, or the wrong transfer syntax."""
    study = draw(st.one_of(_uid_text, HOSTILE_UIDS))
    series = draw(st.one_of(_uid_text, HOSTILE_UIDS))
    sop = draw(st.one_of(_uid_text, HOSTILE_UIDS))
    command_sop = draw(st.one_of(st.just(sop), HOSTILE_UIDS))
    rows = columns = draw(st.sampled_from([1, 4, 16]))
    elements = [
        element(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode()),
        element(0x0008, 0x0018, b"UI", sop.encode("latin-1")),
        element(0x0008, 0x0060, b"CS", b"CT"),
        element(0x0010, 0x0010, b"PN", b"Fuzz^Patient"),
        element(0x0010, 0x0020, b"LO", b"FUZZ-1"),
        element(0x0020, 0x000D, b"UI", study.encode("latin-1")),
        element(0x0020, 0x000E, b"UI", series.encode("latin-1")),
        element(0x0028, 0x0010, b"US", struct.pack("<H", rows)),
        element(0x0028, 0x0011, b"US", struct.pack("<H", columns)),
        element(0x7FE0, 0x0010, b"OW", bytes(2 * rows * columns)),
    ]
    mutation = draw(
        st.sampled_from(
            ["uids", "bad-vr", "lying-length", "nesting", "truncated", "flipped", "syntax"]
        )
    )
    context_id = EXPLICIT_CONTEXT
    if mutation == "bad-vr":
        index = draw(st.integers(0, len(elements) - 1))
        vr = draw(st.binary(min_size=2, max_size=2))
        mangled = bytearray(elements[index])
        mangled[4:6] = vr
        elements[index] = bytes(mangled)
    elif mutation == "lying-length":
        index = draw(st.integers(0, len(elements) - 1))
        length = draw(st.sampled_from([0xFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 1, 3, 10_000_000]))
        group, number, vr = struct.unpack_from("<HH2s", elements[index])
        value = elements[index][12 if vr in _LONG_LENGTH_VRS else 8 :]
        elements[index] = element(group, number, vr, value, length=length)
    elif mutation == "nesting":
        depth = draw(st.sampled_from([1, 50, 500, 3000]))
        elements.insert(3, nested_sequence(depth))
    data_set = b"".join(elements)
    if mutation == "truncated":
        data_set = data_set[: draw(st.integers(0, len(data_set)))]
    elif mutation == "flipped":
        flipped = bytearray(data_set)
        for position in draw(st.lists(st.integers(0, len(data_set) - 1), min_size=1, max_size=8)):
            flipped[position] ^= draw(st.integers(1, 255))
        data_set = bytes(flipped)
    elif mutation == "syntax":
        context_id = IMPLICIT_CONTEXT  # explicit VR bytes on an implicit VR context
    return HostileDataSet(command_sop, data_set, context_id, mutation)


@dataclass(frozen=True)
class PduStep:
    label: str
    data: bytes


def _valid_rq() -> bytes:
    return associate_rq(CONTEXTS, calling_ae="FUZZER", called_ae="DICOMNODE")


@st.composite
def pdu_steps(draw: st.DrawFn) -> PduStep:
    kind = draw(
        st.sampled_from(
            [
                "associate-rq",
                "associate-rq-mangled",
                "associate-rq-lying-item",
                "p-data-random",
                "p-data-lying-pdv",
                "echo",
                "store-command-only",
                "find-rq",
                "release-rq",
                "release-rp",
                "abort",
                "associate-ac",
                "unknown-type",
                "truncated",
                "huge-claim",
                "noise",
            ]
        )
    )
    if kind == "associate-rq":
        return PduStep(kind, _valid_rq())
    if kind == "associate-rq-mangled":
        mangled = bytearray(_valid_rq())
        for position in draw(st.lists(st.integers(6, len(mangled) - 1), min_size=1, max_size=6)):
            mangled[position] = draw(st.integers(0, 255))
        return PduStep(kind, bytes(mangled))
    if kind == "associate-rq-lying-item":
        lying = bytearray(_valid_rq())
        item_offset = 6 + 68  # the first item's header, after the fixed fields
        struct.pack_into(">H", lying, item_offset + 2, draw(st.integers(0, 0xFFFF)))
        return PduStep(kind, bytes(lying))
    if kind == "p-data-random":
        pdvs = draw(
            st.lists(
                st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300)),
                min_size=0,
                max_size=4,
            )
        )
        return PduStep(kind, p_data_tf(pdvs))
    if kind == "p-data-lying-pdv":
        body = struct.pack(">IBB", draw(st.integers(0, 0xFFFFFFFF)), 1, COMMAND_LAST)
        return PduStep(kind, pdu(P_DATA_TF, body + draw(st.binary(max_size=64))))
    if kind == "echo":
        command = command_set(C_ECHO_RQ, 1, VERIFICATION)
        context = draw(st.sampled_from([ECHO_CONTEXT, EXPLICIT_CONTEXT, 7, 0]))
        return PduStep(kind, p_data_tf([(context, COMMAND_LAST, command)]))
    if kind == "store-command-only":
        command = command_set(C_STORE_RQ, 1, CT_IMAGE_STORAGE, "1.2.3.4")
        return PduStep(kind, p_data_tf([(EXPLICIT_CONTEXT, COMMAND_LAST, command)]))
    if kind == "find-rq":
        command = command_set(C_FIND_RQ, 1, CT_IMAGE_STORAGE)
        return PduStep(kind, p_data_tf([(EXPLICIT_CONTEXT, COMMAND_LAST, command)]))
    if kind == "release-rq":
        return PduStep(kind, pdu(A_RELEASE_RQ, b"\x00" * 4))
    if kind == "release-rp":
        return PduStep(kind, pdu(A_RELEASE_RP, b"\x00" * 4))
    if kind == "abort":
        return PduStep(kind, pdu(A_ABORT, b"\x00\x00\x00\x00"))
    if kind == "associate-ac":
        return PduStep(kind, pdu(A_ASSOCIATE_AC, _valid_rq()[6:]))
    if kind == "unknown-type":
        pdu_type = draw(st.sampled_from([0x00, 0x08, 0x09, 0x7F, 0xFF]))
        return PduStep(kind, pdu(pdu_type, draw(st.binary(max_size=64))))
    if kind == "truncated":
        whole = _valid_rq()
        return PduStep(kind, whole[: draw(st.integers(1, len(whole) - 1))])
    if kind == "huge-claim":
        pdu_type = draw(st.sampled_from([A_ASSOCIATE_RQ, P_DATA_TF, A_RELEASE_RQ]))
        claimed = draw(st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF, 0x10000000]))
        return PduStep(kind, pdu(pdu_type, b"\x00" * 64, claimed_length=claimed))
    return PduStep(kind, draw(st.binary(min_size=1, max_size=200)))


PDU_SEQUENCES = st.lists(pdu_steps(), min_size=1, max_size=6)


@dataclass
class FuzzCounts:
    """What the node answered, case by case: ``bench/fuzz.py`` prints these."""

    cases: int = 0
    by_mutation: Counter[str] = field(default_factory=Counter)
    by_answer: Counter[str] = field(default_factory=Counter)

    def add(self, mutation: str, answer: str) -> None:
        self.cases += 1
        self.by_mutation[mutation] += 1
        self.by_answer[answer] += 1


def _statuses(stream: bytes) -> list[int]:
    """The DIMSE statuses in the P-DATA-TF PDUs of ``stream``."""
    statuses = []
    offset = 0
    command = b""
    while offset + 6 <= len(stream):
        pdu_type, _, length = struct.unpack_from(">BBI", stream, offset)
        body = stream[offset + 6 : offset + 6 + length]
        offset += 6 + length
        if pdu_type != P_DATA_TF:
            continue
        for _, control, data in iter_pdv_items(body):
            command += data
            if control == COMMAND_LAST:
                statuses.append(command_status(command))
                command = b""
    return statuses


def answer_label(stream: bytes) -> str:
    """A short description of what the node sent: PDU names and DIMSE statuses."""
    names = {
        A_ASSOCIATE_AC: "AC",
        A_ASSOCIATE_RJ: "RJ",
        P_DATA_TF: "P-DATA",
        A_RELEASE_RP: "RP",
        A_ABORT: "ABORT",
    }
    parts = [names.get(pdu_type, f"type-{pdu_type:#x}") for pdu_type in pdu_types(stream)]
    parts += [f"{status:#06x}" for status in _statuses(stream)]
    return " ".join(parts) or "closed"


def send_pdu_sequence(port: int, steps: list[PduStep]) -> str:
    """Send the steps as they are, stop sending, and return what the node answered."""
    with RawPeer(port, timeout=CASE_TIMEOUT) as peer:
        for step in steps:
            try:
                peer.sock.sendall(step.data)
            except (BrokenPipeError, ConnectionResetError):
                break
        with contextlib.suppress(OSError):
            peer.sock.shutdown(socket.SHUT_WR)
        return answer_label(peer.wait_closed(CASE_TIMEOUT))


def send_hostile_data_set(port: int, case: HostileDataSet) -> tuple[int | None, str]:
    """Associate properly, send the C-STORE, and return its status (None when the node
    answered with an abort or a close instead) and the answer's description."""
    with RawPeer(port, timeout=CASE_TIMEOUT) as peer:
        peer.associate(CONTEXTS, calling_ae="FUZZER")
        for encoded in case.pdus():
            try:
                peer.sock.sendall(encoded)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            status: int | None = peer.read_response_status()
        except (AssertionError, ConnectionError, TimeoutError, OSError):
            status = None
        if status is not None:
            try:
                peer.release()
            except (AssertionError, ConnectionError, OSError):
                return status, f"{status:#06x} then no release"
        return status, "closed" if status is None else f"{status:#06x}"


def echo_status(port: int) -> int:
    """A C-ECHO on a new association: the node is still serving."""
    with RawPeer(port, timeout=CASE_TIMEOUT) as peer:
        accepted = peer.associate(CONTEXTS, calling_ae="FUZZ-ECHO")
        assert ECHO_CONTEXT in accepted.contexts, "verification was not accepted"
        status = peer.echo(ECHO_CONTEXT)
        peer.release()
        return status


_UID = re.compile(r"\A(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")


def is_valid_uid(value: str) -> bool:
    """A UID as PS3.5 9.1 spells it, checked here apart from the node's own code."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None


def files_outside(root: Path, allowed: Path) -> list[Path]:
    """Files under ``root`` that are not under ``allowed``."""
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and allowed not in path.parents and path != allowed
    ]
