"""What the handlers share (settings, spool, indexer) and each association's counters."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.config import Settings
from dicom_node.disk_space import ReceiveWatermark
from dicom_node.records import IndexRecord
from dicom_node.storage import Spool


@dataclass(frozen=True)
class Peer:
    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int


@dataclass
class AssociationState:
    association_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    calling_ae_title: str = ""
    instances_received: int = 0
    instances_failed: int = 0
    bytes_received: int = 0


@dataclass
class ReceiverContext:
    settings: Settings
    spool: Spool
    index: Callable[[IndexRecord], None]
    """Takes the record of what was stored: the indexer's queue, or a pipe to it."""
    watermark: ReceiveWatermark | None = None
    """Says when the spool's disk is too full to receive (None: never)."""
