"""What a receiver tells the indexer: plain records, picklable, no SQLAlchemy (receiver
processes send them down a pipe to the node's indexer)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from db.enums import AssociationStatus
from dicom_node.storage import InstanceKey


@dataclass(frozen=True)
class AssociationOpened:
    association_id: str
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    peer_port: int
    accepted: bool
    reject_reason: str | None
    started_at: dt.datetime


@dataclass(frozen=True)
class AssociationClosed:
    association_id: str
    status: AssociationStatus
    ended_at: dt.datetime
    instances_received: int
    instances_failed: int
    bytes_received: int


@dataclass(frozen=True)
class InstanceStored:
    key: InstanceKey
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    size_bytes: int
    received_at: dt.datetime
    association_id: str | None
    study_date: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None

    @classmethod
    def from_fields(
        cls,
        key: InstanceKey,
        fields: Mapping[str, str | None],
        *,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        path: Path,
        size_bytes: int,
        received_at: dt.datetime,
        association_id: str | None,
    ) -> InstanceStored:
        """From the header values as text (``storage.INDEX_TAGS``), clipped to the index."""
        return cls(
            key=key,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            path=path,
            size_bytes=size_bytes,
            received_at=received_at,
            association_id=association_id,
            study_date=clip_text(fields.get("StudyDate"), 8),
            modality=clip_text(fields.get("Modality"), 16),
            series_number=as_int(fields.get("SeriesNumber")),
            series_description=clip_text(fields.get("SeriesDescription"), 64),
            body_part_examined=clip_text(fields.get("BodyPartExamined"), 16),
            instance_number=as_int(fields.get("InstanceNumber")),
        )


@dataclass(frozen=True)
class CommittedInstance:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class FailedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None


@dataclass(frozen=True)
class CommitmentReported:
    """A PACS's storage commitment result (N-EVENT-REPORT) for a transaction the node asked
    for: what it committed and what it did not (``dicom_node.export.commitment``)."""

    transaction_uid: str
    calling_ae_title: str
    committed: tuple[CommittedInstance, ...]
    failed: tuple[FailedInstance, ...]
    received_at: dt.datetime


IndexRecord = AssociationOpened | AssociationClosed | InstanceStored | CommitmentReported


def clip_text(value: object, length: int) -> str | None:
    if value is None or value == "":
        return None
    return str(value)[:length]


def as_int(value: object) -> int | None:
    try:
        return int(str(value)) if value not in (None, "") else None
    except ValueError:
        return None
