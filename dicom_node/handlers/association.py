"""Association lifecycle: allow-list at request time, a database row per association."""

from __future__ import annotations

import datetime as dt
import os

import structlog

from db.enums import AssociationStatus
from dicom_node.handlers.context import AssociationState, Peer, ReceiverContext
from dicom_node.records import AssociationClosed, AssociationOpened

log = structlog.get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def _opened(
    association_id: str, peer: Peer, accepted: bool, reason: str | None = None
) -> AssociationOpened:
    return AssociationOpened(
        association_id=association_id,
        calling_ae_title=peer.calling_ae_title,
        called_ae_title=peer.called_ae_title,
        peer_address=peer.address,
        peer_port=peer.port,
        accepted=accepted,
        reject_reason=reason,
        started_at=dt.datetime.now(dt.UTC),
    )


def rejection_reason(
    context: ReceiverContext, peer: Peer
) -> tuple[str, tuple[int, int, int]] | None:
    settings = context.settings
    if settings.allowed_peers and not any(
        allowed.admits(peer.calling_ae_title, peer.address) for allowed in settings.allowed_peers
    ):
        return "calling AE title or address not in the allow-list", REJECT_CALLING_AE_NOT_RECOGNISED
    if settings.require_called_ae_title and peer.called_ae_title != settings.ae_title:
        return "called AE title is not this node's", REJECT_CALLED_AE_NOT_RECOGNISED
    return None


def record_rejected(context: ReceiverContext, peer: Peer, reason: str) -> None:
    log.warning(
        "association rejected", calling_ae=peer.calling_ae_title, peer=peer.address, reason=reason
    )
    # Never established: its connection closing is not an "ended" association.
    context.index(_opened(AssociationState().association_id, peer, False, reason))


def record_established(context: ReceiverContext, peer: Peer) -> AssociationState:
    state = AssociationState(calling_ae_title=peer.calling_ae_title)
    log.info(
        "association accepted", calling_ae=peer.calling_ae_title, peer=peer.address, pid=os.getpid()
    )
    context.index(_opened(state.association_id, peer, True))
    return state


def record_closed(context: ReceiverContext, state: AssociationState, released: bool) -> None:
    status = AssociationStatus.RELEASED if released else AssociationStatus.ABORTED
    log.info(
        "association ended",
        status=status.value,
        instances=state.instances_received,
        failed=state.instances_failed,
    )
    context.index(
        AssociationClosed(
            association_id=state.association_id,
            status=status,
            ended_at=dt.datetime.now(dt.UTC),
            instances_received=state.instances_received,
            instances_failed=state.instances_failed,
            bytes_received=state.bytes_received,
        )
    )
