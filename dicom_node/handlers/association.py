"""Association lifecycle: allow-list at request time, a database row per association."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import structlog
from pynetdicom.events import Event

from db.models import AssociationStatus
from dicom_node.handlers.context import AssociationState, ReceiverContext
from dicom_node.index import AssociationClosed, AssociationOpened

log = structlog.get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


def _opened(
    association_id: str, assoc: Any, accepted: bool, reason: str | None = None
) -> AssociationOpened:
    calling, called, address, port = _peer(assoc)
    return AssociationOpened(
        association_id=association_id,
        calling_ae_title=calling,
        called_ae_title=called,
        peer_address=address,
        peer_port=port,
        accepted=accepted,
        reject_reason=reason,
        started_at=dt.datetime.now(dt.UTC),
    )


def _peer(assoc: Any) -> tuple[str, str, str, int]:
    primitive = assoc.requestor.primitive
    return (
        str(primitive.calling_ae_title).strip(),
        str(primitive.called_ae_title).strip(),
        str(assoc.requestor.address),
        int(assoc.requestor.port),
    )


def rejection_reason(
    context: ReceiverContext, calling: str, called: str, address: str
) -> tuple[str, tuple[int, int, int]] | None:
    settings = context.settings
    if settings.allowed_peers and not any(
        peer.admits(calling, address) for peer in settings.allowed_peers
    ):
        return "calling AE title or address not in the allow-list", REJECT_CALLING_AE_NOT_RECOGNISED
    if settings.require_called_ae_title and called != settings.ae_title:
        return "called AE title is not this node's", REJECT_CALLED_AE_NOT_RECOGNISED
    return None


def handle_requested(event: Event, context: ReceiverContext) -> None:
    calling, called, address, _ = _peer(event.assoc)
    verdict = rejection_reason(context, calling, called, address)
    if verdict is None:
        return
    reason, (result, source, diagnostic) = verdict
    log.warning("association rejected", calling_ae=calling, peer=address, reason=reason)
    # Never registered with the context: its connection closing is not an "ended" association.
    context.indexer.put(_opened(AssociationState().association_id, event.assoc, False, reason))
    event.assoc.acse.send_reject(result, source, diagnostic)
    # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is on the wire.
    event.assoc.kill()


def handle_established(event: Event, context: ReceiverContext) -> None:
    calling, _, address, _ = _peer(event.assoc)
    state = context.association_state(event.assoc)
    state.calling_ae_title = calling
    log.info("association accepted", calling_ae=calling, peer=address, pid=os.getpid())
    context.indexer.put(_opened(state.association_id, event.assoc, True))


def handle_closed(event: Event, context: ReceiverContext) -> None:
    state = context.forget_association(event.assoc)
    if state is None:
        return
    status = AssociationStatus.RELEASED if event.assoc.is_released else AssociationStatus.ABORTED
    log.info(
        "association ended",
        status=status.value,
        instances=state.instances_received,
        failed=state.instances_failed,
    )
    context.indexer.put(
        AssociationClosed(
            association_id=state.association_id,
            status=status,
            ended_at=dt.datetime.now(dt.UTC),
            instances_received=state.instances_received,
            instances_failed=state.instances_failed,
            bytes_received=state.bytes_received,
        )
    )
