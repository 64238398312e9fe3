"""What the handlers share: the settings, the spool, the indexer, per-association counters."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import Settings
from dicom_node.index import Indexer
from dicom_node.storage import Spool


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
    indexer: Indexer
    _associations: dict[int, AssociationState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def association_state(self, assoc: Any) -> AssociationState:
        key = id(assoc)
        with self._lock:
            state = self._associations.get(key)
            if state is None:
                state = self._associations[key] = AssociationState()
            return state

    def forget_association(self, assoc: Any) -> AssociationState | None:
        with self._lock:
            return self._associations.pop(id(assoc), None)
