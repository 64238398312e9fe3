"""Association negotiation as the acceptor, with pynetdicom's PDU codecs and negotiation.

pynetdicom's A-ASSOCIATE-RQ/AC encoders and ``negotiate_as_acceptor`` are tested against
many peers; the node keeps them and drops only pynetdicom's threading (see
``dicom_node.ae.association``). The supported contexts are built once per receiver.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.ae.wire import AbortReason, PduType, ProtocolError
from dicom_node.storage import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
# Stored as received, so every transfer syntax pydicom knows is acceptable on ingest.
ACCEPTED_TRANSFER_SYNTAXES: list[str | bytes | UID] = [str(uid) for uid in AllTransferSyntaxes]
VERIFICATION = str(Verification)
STORAGE_SOP_CLASSES = frozenset(
    str(context.abstract_syntax) for context in AllStoragePresentationContexts
)


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae_title: str
    called_ae_title: str
    primitive: A_ASSOCIATE
    max_pdu_length: int
    """The longest P-DATA-TF the peer accepts (0: no limit)."""


@dataclass(frozen=True)
class Negotiated:
    accept_pdu: bytes
    transfer_syntaxes: dict[int, UID]
    """Accepted context ID -> its transfer syntax."""
    abstract_syntaxes: dict[int, str]


def decode_request(header_and_body: bytes) -> AssociationRequest:
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(header_and_body)
        primitive = pdu.to_primitive()
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
    except Exception as exc:  # pynetdicom raises whatever the bytes provoke
        raise ProtocolError(
            f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        ) from None
    if str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
        raise ProtocolError("not the DICOM application context", AbortReason.UNEXPECTED_PDU)
    max_length = 0
    for item in primitive.user_information or []:
        if isinstance(item, MaximumLengthNotification):
            max_length = int(item.maximum_length_received or 0)
    return AssociationRequest(calling, called, primitive, max_length)


def _context(abstract_syntax: str) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = ACCEPTED_TRANSFER_SYNTAXES
    return context


class Negotiator:
    """The node's presentation contexts: Verification and storage, any transfer syntax.

    With ``accept_unknown_sop_classes``, any abstract syntax that is not Verification is
    taken as storage of a SOP class the node does not know (a vendor's private one).
    """

    def __init__(self, ae_title: str, max_pdu_length: int, accept_unknown: bool) -> None:
        self.ae_title = ae_title
        self.max_pdu_length = max_pdu_length
        self.accept_unknown = accept_unknown
        self.supported = [_context(VERIFICATION)] + [
            _context(uid) for uid in sorted(STORAGE_SOP_CLASSES)
        ]

    def negotiate(self, request: AssociationRequest) -> Negotiated:
        proposed: list[PresentationContext] = request.primitive.presentation_context_definition_list
        supported = self.supported
        if self.accept_unknown:
            known = STORAGE_SOP_CLASSES | {VERIFICATION}
            supported = supported + [
                _context(str(uid))
                for uid in {str(context.abstract_syntax) for context in proposed} - known
            ]
        roles = {
            UID(item.sop_class_uid): (item.scu_role, item.scp_role)
            for item in request.primitive.user_information or []
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        try:
            results, role_replies = negotiate_as_acceptor(proposed, supported, roles)
        except Exception as exc:
            raise ProtocolError(
                f"presentation contexts not negotiable ({type(exc).__name__})",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            ) from None
        accepted = [context for context in results if context.result == 0x00]
        _prefer_the_requestors_transfer_syntax(accepted, proposed)
        return Negotiated(
            accept_pdu=self._accept_pdu(request, results, role_replies),
            transfer_syntaxes={
                int(context.context_id or 0): UID(context.transfer_syntax[0])
                for context in accepted
            },
            abstract_syntaxes={
                int(context.context_id or 0): str(context.abstract_syntax) for context in accepted
            },
        )

    def _accept_pdu(
        self,
        request: AssociationRequest,
        results: list[PresentationContext],
        role_replies: list[SCP_SCU_RoleSelectionNegotiation],
    ) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        primitive.calling_ae_title = request.primitive.calling_ae_title
        primitive.called_ae_title = request.primitive.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.max_pdu_length
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        user_information: list[Any] = [maximum, class_uid, version, *role_replies]
        if any(
            isinstance(item, AsynchronousOperationsWindowNegotiation)
            for item in request.primitive.user_information or []
        ):
            user_information.append(AsynchronousOperationsWindowNegotiation())  # 1 and 1
        primitive.user_information = user_information
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        return bytes(pdu.encode())


def _prefer_the_requestors_transfer_syntax(
    accepted: list[PresentationContext], proposed: list[PresentationContext]
) -> None:
    """pynetdicom takes the first of the acceptor's transfer syntaxes the requestor offers
    (implicit VR little endian, for the node's list). A sender that offers its file's own
    syntax first, then uncompressed ones (dcmsend, storescu), would then convert: JPEG
    decompressed, private elements' VRs lost. The node stores what it is sent, so it
    takes the requestor's first choice among those it accepts."""
    offered = {context.context_id: context.transfer_syntax for context in proposed}
    acceptable = set(ACCEPTED_TRANSFER_SYNTAXES)
    for context in accepted:
        first = next((ts for ts in offered.get(context.context_id, []) if ts in acceptable), None)
        if first is not None:
            context.transfer_syntax = [first]


def request_bytes(body: memoryview) -> bytes:
    """The whole A-ASSOCIATE-RQ PDU, header included, as pynetdicom's decoder reads it."""
    return struct.pack(">BxI", PduType.ASSOCIATE_RQ, len(body)) + bytes(body)
