"""Association negotiation as the acceptor (PS3.8 9.3.2-9.3.3, PS3.7 D.3.3).

The A-ASSOCIATE-RQ is parsed and the A-ASSOCIATE-AC built here, by hand: pynetdicom's
codecs and ``negotiate_as_acceptor`` validated every UID of the request through pydicom
and pynetdicom (about 20,000 regular-expression checks for the 128 contexts DCMTK's
storescu proposes) and cost 19-22 ms per association, which made a modality that opens
an association per image slower here than on Orthanc. The rules are pynetdicom's
(``tests/dicom_node/ae/test_negotiation.py`` checks them against its encoders and
decoders), with one difference: the requestor's first acceptable transfer syntax wins.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts, sop_class

from dicom_node.ae.commitment import STORAGE_COMMITMENT_PUSH_MODEL
from dicom_node.ae.wire import AbortReason, PduType, ProtocolError
from dicom_node.storage import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# Stored as received, so every transfer syntax pydicom knows is acceptable on ingest.
ACCEPTED_TRANSFER_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes)
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES = frozenset(
    str(context.abstract_syntax) for context in AllStoragePresentationContexts
)
KNOWN_SOP_CLASSES = frozenset(
    str(value)
    for name, value in vars(sop_class).items()
    if not name.startswith("_") and isinstance(value, str) and value[:1].isdigit()
)
"""Every SOP class pynetdicom knows: with ``accept_unknown_sop_classes``, the others are
taken as storage (a vendor's private class), as pynetdicom's unrestricted storage did."""

RESULT_ACCEPTANCE = 0x00
RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
RESULT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04

_FIXED_FIELDS = struct.Struct(">HH16s16s32s")
_ITEM_HEADER = struct.Struct(">BxH")


@dataclass(frozen=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae_title: str
    called_ae_title: str
    raw_ae_titles: bytes
    """Called and calling AE title fields as sent: the AC repeats them (PS3.8 9.3.3)."""
    contexts: tuple[ProposedContext, ...]
    max_pdu_length: int = 0
    """The longest P-DATA-TF the peer accepts (0: no limit)."""
    asks_for_async_window: bool = False
    roles: tuple[tuple[str, bool, bool], ...] = ()
    """The SCP/SCU role selections proposed: (SOP class UID, SCU role, SCP role)."""


@dataclass(frozen=True)
class Negotiated:
    accept_pdu: bytes
    transfer_syntaxes: dict[int, str]
    """Accepted context ID -> its transfer syntax."""
    abstract_syntaxes: dict[int, str]


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip("\x00 ")


def _items(data: bytes | memoryview, what: str) -> list[tuple[int, bytes]]:
    """The (type, value) items of a variable field: each a type, a reserved byte, a
    two-byte length and the value, every length checked against what is left."""
    items = []
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _ITEM_HEADER.size:
            raise ProtocolError(
                f"truncated item in {what}", AbortReason.INVALID_PDU_PARAMETER_VALUE
            )
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        offset += _ITEM_HEADER.size
        if offset + length > end:
            raise ProtocolError(
                f"item longer than its {what}", AbortReason.INVALID_PDU_PARAMETER_VALUE
            )
        items.append((item_type, bytes(data[offset : offset + length])))
        offset += length
    return items


def _presentation_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ProtocolError(
            "truncated presentation context", AbortReason.INVALID_PDU_PARAMETER_VALUE
        )
    abstract, syntaxes = "", []
    for item_type, item in _items(value[4:], "presentation context"):
        if item_type == 0x30:
            abstract = _text(item)
        elif item_type == 0x40:
            syntaxes.append(_text(item))
    if not abstract or not syntaxes:
        raise ProtocolError(
            "presentation context without an abstract or a transfer syntax",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        )
    return ProposedContext(value[0], abstract, tuple(syntaxes))


def _role(value: bytes) -> tuple[str, bool, bool]:
    """An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4): UID length, UID, two roles."""
    if len(value) < 2 or len(value) != 2 + int.from_bytes(value[:2], "big") + 2:
        raise ProtocolError("malformed role selection", AbortReason.INVALID_PDU_PARAMETER_VALUE)
    return _text(value[2:-2]), bool(value[-2]), bool(value[-1])


def decode_request(body: bytes | memoryview) -> AssociationRequest:
    """An A-ASSOCIATE-RQ, from the PDU's body (what follows its 6-byte header).

    Role selections are kept for storage commitment only: there a PACS asks to be the SCP
    so that it can send the node its N-EVENT-REPORT. For every other SOP class the node
    answers none, as pynetdicom's acceptor with default roles: the requestor is the SCU
    and the node the SCP (PS3.7 D.3.3.4).
    """
    if len(body) < _FIXED_FIELDS.size:
        raise ProtocolError("truncated A-ASSOCIATE-RQ", AbortReason.INVALID_PDU_PARAMETER_VALUE)
    _version, _, called, calling, _ = _FIXED_FIELDS.unpack_from(body, 0)
    context_name, contexts, user = "", [], []
    for item_type, value in _items(memoryview(body)[_FIXED_FIELDS.size :], "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            context_name = _text(value)
        elif item_type == 0x20:
            contexts.append(_presentation_context(value))
        elif item_type == 0x50:
            user = _items(value, "user information")
    if context_name != APPLICATION_CONTEXT_NAME:
        raise ProtocolError("not the DICOM application context", AbortReason.UNEXPECTED_PDU)
    max_length = next((int.from_bytes(v, "big") for t, v in user if t == 0x51 and len(v) == 4), 0)
    return AssociationRequest(
        calling_ae_title=_text(calling),
        called_ae_title=_text(called),
        raw_ae_titles=called + calling,
        contexts=tuple(contexts),
        max_pdu_length=max_length,
        asks_for_async_window=any(item_type == 0x53 for item_type, _ in user),
        roles=tuple(_role(value) for item_type, value in user if item_type == 0x54),
    )


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(item_type, len(value)) + value


class Negotiator:
    """The node's presentation contexts: Verification and storage, any transfer syntax,
    and the Storage Commitment Push Model as the SCU (a PACS reports its results to it).

    With ``accept_unknown_sop_classes``, any abstract syntax pynetdicom does not know is
    taken as storage of a SOP class the node does not know (a vendor's private one).
    """

    def __init__(self, max_pdu_length: int, accept_unknown: bool) -> None:
        self.max_pdu_length = max_pdu_length
        self.accept_unknown = accept_unknown

    def supports(self, abstract_syntax: str) -> bool:
        if abstract_syntax in (VERIFICATION, STORAGE_COMMITMENT_PUSH_MODEL):
            return True
        if abstract_syntax in STORAGE_SOP_CLASSES:
            return True
        return self.accept_unknown and abstract_syntax not in KNOWN_SOP_CLASSES

    def negotiate(self, request: AssociationRequest) -> Negotiated:
        transfer_syntaxes: dict[int, str] = {}
        abstract_syntaxes: dict[int, str] = {}
        results = []
        for context in sorted(request.contexts, key=lambda c: c.context_id):
            chosen = next(
                (ts for ts in context.transfer_syntaxes if ts in ACCEPTED_TRANSFER_SYNTAXES), None
            )
            if not self.supports(context.abstract_syntax):
                result = RESULT_ABSTRACT_SYNTAX_NOT_SUPPORTED
            elif chosen is None:
                result = RESULT_TRANSFER_SYNTAXES_NOT_SUPPORTED
            else:
                result = RESULT_ACCEPTANCE
                transfer_syntaxes[context.context_id] = chosen
                abstract_syntaxes[context.context_id] = context.abstract_syntax
            syntax = chosen or context.transfer_syntaxes[0]  # ignored by the peer unless accepted
            results.append(
                _item(
                    0x21, bytes((context.context_id, 0, result, 0)) + _item(0x40, syntax.encode())
                )
            )
        # The PACS is the storage commitment SCP here (it sends N-EVENT-REPORTs), the node
        # the SCU: a proposed SCP role is accepted, an SCU role is not (PS3.7 D.3.3.4).
        proposed = {uid for uid, _scu, scp in request.roles if scp}
        roles = [
            _item(0x54, struct.pack(">H", len(uid)) + uid.encode() + bytes((0, 1)))
            for uid in (STORAGE_COMMITMENT_PUSH_MODEL,)
            if uid in proposed and uid in abstract_syntaxes.values()
        ]
        return Negotiated(
            self._accept_pdu(request, results, roles), transfer_syntaxes, abstract_syntaxes
        )

    def _accept_pdu(
        self, request: AssociationRequest, results: list[bytes], roles: list[bytes]
    ) -> bytes:
        user_information = [
            _item(0x51, struct.pack(">I", self.max_pdu_length)),
            _item(0x52, IMPLEMENTATION_CLASS_UID.encode()),
        ]
        if request.asks_for_async_window:  # one operation at a time, both ways
            user_information.append(_item(0x53, struct.pack(">HH", 1, 1)))
        user_information += roles
        user_information.append(_item(0x55, IMPLEMENTATION_VERSION_NAME.encode()))
        variable = b"".join(
            [
                _item(0x10, APPLICATION_CONTEXT_NAME.encode()),
                *results,
                _item(0x50, b"".join(user_information)),
            ]
        )
        fixed = struct.pack(">HH", 1, 0) + request.raw_ae_titles + bytes(32)
        return struct.pack(">BxI", PduType.ASSOCIATE_AC, len(fixed) + len(variable)) + (
            fixed + variable
        )
