"""DIMSE command sets (PS3.7 9.3, E.1): always Implicit VR Little Endian, group 0000 only.

The receive path needs a handful of command elements and answers with a response of
six or seven, so both ways are coded here by hand: pydicom's general codec costs more
than a command's whole round trip (``tests/dicom_node/ae/test_dimse.py`` checks this
codec against pydicom's and pynetdicom's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicom_node.ae.wire import AbortReason, ProtocolError

MAX_COMMAND_BYTES = 64 * 1024
"""A command set is a few hundred bytes; a peer sending more is not sending DIMSE."""

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101

_AFFECTED_SOP_CLASS_UID = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
_COMMAND_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE_UID = 0x1000
_EVENT_TYPE_ID = 0x1002

_ELEMENT_HEADER = struct.Struct("<HHI")


@dataclass(frozen=True)
class Command:
    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    event_type_id: int | None = None
    """An N-EVENT-REPORT's Event Type ID (None in any other command)."""


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\x00 ")


def _unsigned_short(element: int, value: bytes) -> int:
    if len(value) != 2:
        raise ProtocolError(
            f"command element (0000,{element:04X}) is not a US",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        )
    return int.from_bytes(value, "little")


def decode_command(encoded: bytes) -> Command:
    """The elements of a request the node acts on; anything malformed is a protocol error."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(encoded)
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            raise ProtocolError("truncated command set", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        group, element, length = _ELEMENT_HEADER.unpack_from(encoded, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0x0000 or offset + length > end:
            raise ProtocolError(
                "malformed command set element", AbortReason.INVALID_PDU_PARAMETER_VALUE
            )
        values[element] = encoded[offset : offset + length]
        offset += length
    if _COMMAND_FIELD not in values:
        raise ProtocolError("command set without a Command Field")
    data_set_type = values.get(_COMMAND_DATA_SET_TYPE, b"\x01\x01")
    return Command(
        command_field=_unsigned_short(_COMMAND_FIELD, values[_COMMAND_FIELD]),
        message_id=_unsigned_short(_MESSAGE_ID, values.get(_MESSAGE_ID, b"\x00\x00")),
        has_data_set=_unsigned_short(_COMMAND_DATA_SET_TYPE, data_set_type) != NO_DATA_SET,
        affected_sop_class_uid=_text(values.get(_AFFECTED_SOP_CLASS_UID, b"")),
        affected_sop_instance_uid=_text(values.get(_AFFECTED_SOP_INSTANCE_UID, b"")),
        event_type_id=(
            _unsigned_short(_EVENT_TYPE_ID, values[_EVENT_TYPE_ID])
            if _EVENT_TYPE_ID in values
            else None
        ),
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The response command set to ``request``: the same SOP class/instance (and event
    type, for an N-EVENT-REPORT), ``status``."""
    body = [
        _element(_AFFECTED_SOP_CLASS_UID, _padded(request.affected_sop_class_uid, b"\x00")),
        _element(_COMMAND_FIELD, struct.pack("<H", request.command_field | RESPONSE_BIT)),
        _element(_MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", request.message_id)),
        _element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if error_comment:
        body.append(_element(_ERROR_COMMENT, _padded(error_comment[:64], b" ")))
    if request.affected_sop_instance_uid:
        body.append(
            _element(
                _AFFECTED_SOP_INSTANCE_UID, _padded(request.affected_sop_instance_uid, b"\x00")
            )
        )
    if request.event_type_id is not None:
        body.append(_element(_EVENT_TYPE_ID, struct.pack("<H", request.event_type_id)))
    encoded = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(encoded))) + encoded
