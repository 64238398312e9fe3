"""C-ECHO (Verification): always success while the node is serving."""

from __future__ import annotations

from pynetdicom.events import Event

from dicom_node.dimse_status import DimseStatus
from dicom_node.handlers.context import ReceiverContext


def handle_echo(event: Event, context: ReceiverContext) -> int:
    return DimseStatus.SUCCESS
