"""The hand-written command set codec against pynetdicom's and pydicom's."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from dicom_node.ae.dimse import C_ECHO_RQ, C_STORE_RQ, decode_command, encode_response
from dicom_node.ae.wire import ProtocolError


def pynetdicom_command(primitive: C_STORE | C_ECHO) -> bytes:
    from pynetdicom import dimse_messages

    message = (
        dimse_messages.C_STORE_RQ()
        if isinstance(primitive, C_STORE)
        else dimse_messages.C_ECHO_RQ()
    )
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def test_c_store_request_as_pynetdicom_encodes_it() -> None:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3.4.5"  # odd length: padded with a NUL
    request.Priority = 2
    request.DataSet = BytesIO(b"\x00" * 8)
    command = decode_command(pynetdicom_command(request))
    assert command.command_field == C_STORE_RQ and command.message_id == 7
    assert command.has_data_set
    assert command.affected_sop_class_uid == CTImageStorage
    assert command.affected_sop_instance_uid == "1.2.3.4.5"


def test_c_echo_request_has_no_data_set() -> None:
    request = C_ECHO()
    request.MessageID = 65535
    command = decode_command(pynetdicom_command(request))
    assert command.command_field == C_ECHO_RQ and command.message_id == 65535
    assert not command.has_data_set


@pytest.mark.parametrize("comment", [None, "Cannot parse the data set", "x" * 70])
def test_response_reads_back_with_pydicom(comment: str | None) -> None:
    request = decode_command(
        b"".join(
            [
                b"\x00\x00\x02\x00\x1a\x00\x00\x00" + CTImageStorage.encode() + b"\x00",
                b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00",
                b"\x00\x00\x10\x01\x02\x00\x00\x00\x09\x00",
                b"\x00\x00\x00\x08\x02\x00\x00\x00\x00\x00",
                b"\x00\x00\x00\x10\x06\x00\x00\x001.2.3\x00",
            ]
        )
    )
    response = read_dataset(
        BytesIO(encode_response(request, 0xC000, comment)),
        is_implicit_VR=True,
        is_little_endian=True,
    )
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 9
    assert response.CommandDataSetType == 0x0101
    assert response.Status == 0xC000
    assert response.AffectedSOPClassUID == CTImageStorage
    assert response.AffectedSOPInstanceUID == "1.2.3"
    assert response.get("ErrorComment") == (comment[:64] if comment else None)
    length = len(encode_response(request, 0xC000, comment)) - 12
    assert response.CommandGroupLength == length


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x01\x02\x00",  # truncated element header
        b"\x00\x00\x00\x01\xff\xff\xff\x7f\x01\x00",  # a length past the end
        b"\x08\x00\x18\x00\x02\x00\x00\x001.",  # not group 0000
        b"\x00\x00\x00\x01\x04\x00\x00\x00\x01\x00\x00\x00",  # Command Field not a US
        b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00",  # no Command Field
    ],
)
def test_malformed_command_sets_are_protocol_errors(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_command(garbage)
