"""Negotiation as the acceptor: pynetdicom's codecs and rules, the node's contexts."""

from __future__ import annotations

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import build_context, build_role
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.ae.negotiation import Negotiator, decode_request
from dicom_node.ae.wire import ProtocolError
from dicom_node.storage import IMPLEMENTATION_CLASS_UID

PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"  # Siemens CSA non-image


def request_body(contexts: list[tuple[str, list[str]]], *extra: object) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "CT_SCANNER"
    primitive.called_ae_title = "DICOMNODE"
    built = []
    for number, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * number + 1
        built.append(context)
    primitive.presentation_context_definition_list = built
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [maximum, implementation, *extra]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())[6:]  # the body, as the node's PDU reader returns it


def accepted(pdu: bytes) -> A_ASSOCIATE:
    decoded = A_ASSOCIATE_AC()
    decoded.decode(pdu)
    return decoded.to_primitive()


def test_storage_and_echo_accepted_with_the_requestors_transfer_syntax() -> None:
    negotiator = Negotiator(1 << 20, accept_unknown=False)
    request = decode_request(
        request_body(
            [
                (CTImageStorage, [JPEG2000Lossless]),
                (Verification, [ImplicitVRLittleEndian]),
                (PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian]),
            ]
        )
    )
    assert (request.calling_ae_title, request.called_ae_title) == ("CT_SCANNER", "DICOMNODE")
    assert request.max_pdu_length == 16384
    negotiated = negotiator.negotiate(request)
    assert negotiated.transfer_syntaxes == {1: JPEG2000Lossless, 3: ImplicitVRLittleEndian}
    assert negotiated.abstract_syntaxes == {1: CTImageStorage, 3: Verification}
    reply = accepted(negotiated.accept_pdu)
    results = {c.context_id: c.result for c in reply.presentation_context_definition_results_list}
    assert results == {1: 0x00, 3: 0x00, 5: 0x03}  # 0x03: abstract syntax not supported
    assert reply.maximum_length_received == 1 << 20
    assert reply.implementation_class_uid == IMPLEMENTATION_CLASS_UID


def test_unknown_sop_classes_accepted_when_configured() -> None:
    negotiator = Negotiator(1 << 20, accept_unknown=True)
    request = decode_request(request_body([(PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian])]))
    assert negotiator.negotiate(request).abstract_syntaxes == {1: PRIVATE_SOP_CLASS}


def test_role_selection_and_async_window_proposals() -> None:
    negotiator = Negotiator(1 << 20, accept_unknown=False)
    role = build_role(CTImageStorage, scu_role=True, scp_role=True)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    request = decode_request(
        request_body([(CTImageStorage, [ExplicitVRLittleEndian])], role, window)
    )
    negotiated = negotiator.negotiate(request)
    assert negotiated.abstract_syntaxes == {1: CTImageStorage}
    reply = accepted(negotiated.accept_pdu)
    # As pynetdicom's own acceptor: no role item back, so the default roles hold (the
    # requestor is the SCU, the node the SCP), which is all a storage SCP offers.
    roles = [i for i in reply.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert roles == []
    [window_reply] = [
        i for i in reply.user_information if isinstance(i, AsynchronousOperationsWindowNegotiation)
    ]
    assert window_reply.maximum_number_operations_invoked == 1
    assert window_reply.maximum_number_operations_performed == 1


@pytest.mark.parametrize(
    ("scu_role", "scp_role", "reply"),
    [(False, True, (False, True)), (True, True, (False, True)), (True, False, None)],
)
def test_a_pacs_is_accepted_as_the_storage_commitment_scp(
    scu_role: bool, scp_role: bool, reply: tuple[bool, bool] | None
) -> None:
    """A PACS reporting storage commitment results proposes the SCP role for itself; the
    node takes it (and never the SCU role: it commits nothing itself)."""
    commitment = "1.2.840.10008.1.20.1"
    role = build_role(commitment, scu_role=scu_role, scp_role=scp_role)
    request = decode_request(request_body([(commitment, [ImplicitVRLittleEndian])], role))
    negotiated = Negotiator(1 << 20, accept_unknown=False).negotiate(request)
    assert negotiated.abstract_syntaxes == {1: commitment}
    roles = [
        (item.sop_class_uid, item.scu_role, item.scp_role)
        for item in accepted(negotiated.accept_pdu).user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    ]
    assert roles == ([] if reply is None else [(commitment, *reply)])


FIXED_FIELDS = b"\x00\x01\x00\x00" + b"CALLED".ljust(16) + b"CALLING".ljust(16) + bytes(32)
APPLICATION_CONTEXT = b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 16,  # shorter than the fixed fields
        FIXED_FIELDS,  # no application context
        FIXED_FIELDS + b"\x10\x00\x00\x05" + b"1.2.3",  # another application context
        FIXED_FIELDS + APPLICATION_CONTEXT + b"\x20\x00\xff\xff\x01",  # item past the end
        FIXED_FIELDS + APPLICATION_CONTEXT + b"\x20\x00\x00\x02\x01\x00",  # truncated context
        # a context without a transfer syntax
        FIXED_FIELDS
        + APPLICATION_CONTEXT
        + b"\x20\x00\x00\x0b\x01\x00\x00\x00"
        + b"\x30\x00\x00\x03"
        + b"1.2",
    ],
)
def test_malformed_requests_are_protocol_errors(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(garbage)


def test_the_requestors_first_transfer_syntax_is_taken() -> None:
    """dcmsend and storescu offer the file's own syntax first, then uncompressed ones: the
    node takes the first, so nothing is converted on the way."""
    negotiator = Negotiator(1 << 20, accept_unknown=False)
    offered = [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    request = decode_request(request_body([(CTImageStorage, offered)]))
    assert negotiator.negotiate(request).transfer_syntaxes == {1: JPEG2000Lossless}
