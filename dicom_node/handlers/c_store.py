"""C-STORE: check the header, write the dataset as received (durably), queue it for indexing.

Statuses (PS3.4 B.2.3): 0x0000 success, 0xA700 out of resources (the file could not be
written), 0xA900 data set does not match SOP class (the dataset's SOP class or instance
UID differs from the request's), 0xC000 cannot understand (unparseable header, a missing
or invalid UID, a duplicate refused by policy); the codes come from ``dicom_node.dimse_status``.
"""

from __future__ import annotations

import datetime as dt
import zlib
from io import BytesIO
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.events import Event

from dicom_node.config import DuplicatePolicy
from dicom_node.dimse_status import DimseStatus
from dicom_node.handlers.context import ReceiverContext
from dicom_node.index import InstanceStored, as_int, clip_text
from dicom_node.storage import (
    InstanceKey,
    InvalidUIDError,
    encode_file_meta,
    header_text,
    is_valid_uid,
)

log = structlog.get_logger(__name__)

_LAST_INDEXED_TAG = 0x00200013  # InstanceNumber: every tag the index needs comes before it


def _past_index_tags(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return bool(tag > _LAST_INDEXED_TAG)


def failure(status: DimseStatus, comment: str) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = comment[:64]
    return response


def read_header(encoded: bytes, transfer_syntax: UID) -> Dataset:
    """Parse the dataset up to the last tag the index needs; pixel data is never touched."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        encoded = zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded, 256 * 1024)
    return read_dataset(
        BytesIO(encoded),
        is_implicit_VR=transfer_syntax.is_implicit_VR,
        is_little_endian=transfer_syntax.is_little_endian,
        stop_when=_past_index_tags,
    )


def handle_store(event: Event, context: ReceiverContext) -> int | Dataset:
    state = context.association_state(event.assoc)
    request: Any = event.request
    encoded: bytes = request.DataSet.getvalue()
    transfer_syntax = UID(event.context.transfer_syntax)
    try:
        header = read_header(encoded, transfer_syntax)
        sop_class_uid = header_text(header, "SOPClassUID")
        sop_instance_uid = header_text(header, "SOPInstanceUID")
    except Exception as exc:
        state.instances_failed += 1
        log.warning("C-STORE refused: header not parseable", error=str(exc)[:200])
        return failure(DimseStatus.CANNOT_UNDERSTAND, "Cannot parse the data set")

    if not is_valid_uid(sop_class_uid):
        state.instances_failed += 1
        log.warning("C-STORE refused: SOP Class UID missing or invalid")
        return failure(DimseStatus.CANNOT_UNDERSTAND, "SOP Class UID missing or invalid")
    if sop_class_uid != request.AffectedSOPClassUID:
        state.instances_failed += 1
        log.warning("C-STORE refused: SOP class differs from the request")
        return failure(
            DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from request"
        )
    if sop_instance_uid != request.AffectedSOPInstanceUID:
        state.instances_failed += 1
        log.warning("C-STORE refused: SOP instance UID differs from the request")
        return failure(
            DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from request"
        )
    try:
        key = InstanceKey.checked(
            header_text(header, "StudyInstanceUID"),
            header_text(header, "SeriesInstanceUID"),
            sop_instance_uid,
        )
    except InvalidUIDError as exc:
        state.instances_failed += 1
        log.warning("C-STORE refused: invalid UID", reason=str(exc))
        return failure(DimseStatus.CANNOT_UNDERSTAND, str(exc).split(":")[0])

    policy = context.settings.duplicate_policy
    duplicate = context.spool.exists(key)
    if duplicate and policy is not DuplicatePolicy.OVERWRITE:
        if policy is DuplicatePolicy.REJECT:
            state.instances_failed += 1
            log.info(
                "C-STORE refused: duplicate SOP instance", sop_instance_uid=key.sop_instance_uid
            )
            return failure(DimseStatus.CANNOT_UNDERSTAND, "Duplicate SOP Instance refused")
        log.info("duplicate SOP instance ignored", sop_instance_uid=key.sop_instance_uid)
        state.instances_received += 1
        return DimseStatus.SUCCESS

    try:
        meta = encode_file_meta(
            str(sop_class_uid), key.sop_instance_uid, str(transfer_syntax), state.calling_ae_title
        )
        path, size = context.spool.write(key, [meta, encoded])
    except OSError as exc:
        state.instances_failed += 1
        log.error("C-STORE failed: cannot write to the spool", error=str(exc))
        return failure(DimseStatus.OUT_OF_RESOURCES, "Cannot write the instance to storage")
    if duplicate:
        log.info("duplicate SOP instance overwritten", sop_instance_uid=key.sop_instance_uid)

    state.instances_received += 1
    state.bytes_received += len(encoded)
    context.indexer.put(
        InstanceStored(
            key=key,
            sop_class_uid=str(sop_class_uid),
            transfer_syntax_uid=str(transfer_syntax),
            path=path,
            size_bytes=size,
            received_at=dt.datetime.now(dt.UTC),
            association_id=state.association_id,
            study_date=clip_text(header_text(header, "StudyDate"), 8),
            modality=clip_text(header_text(header, "Modality"), 16),
            series_number=as_int(header_text(header, "SeriesNumber")),
            series_description=clip_text(header_text(header, "SeriesDescription"), 64),
            body_part_examined=clip_text(header_text(header, "BodyPartExamined"), 16),
            instance_number=as_int(header_text(header, "InstanceNumber")),
        )
    )
    return DimseStatus.SUCCESS
