"""The node's SCP: C-ECHO and C-STORE for every storage SOP class pynetdicom knows."""

from __future__ import annotations

from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import Settings
from dicom_node.handlers.association import handle_closed, handle_established, handle_requested
from dicom_node.handlers.c_echo import handle_echo
from dicom_node.handlers.c_store import handle_store
from dicom_node.handlers.context import ReceiverContext

# Stored as received, so every transfer syntax pydicom knows is acceptable on ingest.
ACCEPTED_TRANSFER_SYNTAXES = [str(uid) for uid in AllTransferSyntaxes]


def build_ae(settings: Settings) -> AE:
    """The SCP's AE. Unknown SOP classes are accepted only while the receiver holds
    ``pynetdicom_internals.unrestricted_storage_service`` (pynetdicom has no per-AE switch)."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def event_handlers(context: ReceiverContext) -> list[Any]:
    return [
        (evt.EVT_REQUESTED, handle_requested, [context]),
        (evt.EVT_ESTABLISHED, handle_established, [context]),
        (evt.EVT_CONN_CLOSE, handle_closed, [context]),
        (evt.EVT_C_ECHO, handle_echo, [context]),
        (evt.EVT_C_STORE, handle_store, [context]),
    ]
