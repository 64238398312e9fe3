"""C-STORE: the dataset streamed to a spool file as it arrives, checked, filed, queued for indexing.

Statuses (PS3.4 B.2.3): 0x0000 success, 0xA700 out of resources (the file could not be
written, or the spool's disk is below the low-disk watermark, ``dicom_node.disk_space``),
0xA900 data set does not match SOP class (the dataset's SOP class or instance UID differs
from the request's), 0xC000 cannot understand (unparseable header, a missing or invalid
UID, a duplicate refused by policy); the codes come from ``dicom_node.dimse_status``.

Memory stays bounded whatever the instance's size: fragments go to the temp file as they
come, and only the first ``HEAD_BYTES`` are kept to read the header from.
"""

from __future__ import annotations

import datetime as dt
import struct
import zlib
from io import BytesIO
from typing import BinaryIO

import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.ae.dimse import Command
from dicom_node.config import DuplicatePolicy
from dicom_node.dimse_status import DimseStatus
from dicom_node.handlers.context import AssociationState, ReceiverContext
from dicom_node.records import InstanceStored
from dicom_node.storage import (
    IncomingFile,
    InstanceKey,
    InvalidUIDError,
    encode_file_meta,
    header_text,
    is_valid_uid,
)

log = structlog.get_logger(__name__)

_LAST_INDEXED_TAG = 0x00200013  # InstanceNumber: every tag the index needs comes before it
HEAD_BYTES = 64 * 1024
"""Dataset bytes kept in memory to read the header from; a longer header is read from the file."""
_DEFLATED_HEADER_BYTES = 256 * 1024

Outcome = tuple[int, str | None]
"""A DIMSE status and its error comment."""

SUCCESS: Outcome = (DimseStatus.SUCCESS, None)
LOW_DISK: Outcome = (DimseStatus.OUT_OF_RESOURCES, "Disk space low: receiving paused")


class _HeaderReader:
    """Reads a dataset up to the last tag the index needs; pixel data is never touched."""

    def __init__(self, transfer_syntax: UID) -> None:
        self.transfer_syntax = transfer_syntax
        self.reached_last_tag = False

    def _stop(self, tag: BaseTag, _vr: str | None, _length: int) -> bool:
        if tag > _LAST_INDEXED_TAG:
            self.reached_last_tag = True
        return self.reached_last_tag

    def read(self, stream: BinaryIO) -> Dataset:
        self.reached_last_tag = False
        syntax = self.transfer_syntax
        return read_dataset(
            stream,
            is_implicit_VR=syntax.is_implicit_VR,
            is_little_endian=syntax.is_little_endian,
            stop_when=self._stop,
            defer_size=HEAD_BYTES,
        )


_INDEXED_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080060: "Modality",
    0x0008103E: "SeriesDescription",
    0x00180015: "BodyPartExamined",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
}
_LONG_LENGTH_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_TAG_AND_SHORT_LENGTH = struct.Struct("<HH2sH")
_TAG_AND_LONG_LENGTH = struct.Struct("<HHI")

Fields = dict[str, str | None]
"""The index's header values, as text straight from the bytes (``storage.header_text``)."""


def scan_index_fields(head: bytes | bytearray, implicit_vr: bool, complete: bool) -> Fields | None:
    """The indexed values of a little endian dataset's first bytes, read by hand: a tenth of
    pydicom's cost. None when something needs pydicom (a sequence of undefined length
    before the last indexed tag, or ``head`` ending before it while the dataset goes on)."""
    fields: Fields = dict.fromkeys(_INDEXED_TAGS.values())
    offset, end = 0, len(head)
    while offset + 8 <= end:
        group, element, vr, short_length = _TAG_AND_SHORT_LENGTH.unpack_from(head, offset)
        tag = group << 16 | element
        if tag > _LAST_INDEXED_TAG:
            return fields
        if implicit_vr:
            length, offset = _TAG_AND_LONG_LENGTH.unpack_from(head, offset)[2], offset + 8
        elif vr in _LONG_LENGTH_VRS:
            if offset + 12 > end:
                return None
            length, offset = _TAG_AND_LONG_LENGTH.unpack_from(head, offset + 4)[2], offset + 12
        else:
            length, offset = short_length, offset + 8
        if length == 0xFFFFFFFF or offset + length > end:
            return None
        keyword = _INDEXED_TAGS.get(tag)
        if keyword is not None:
            fields[keyword] = (
                head[offset : offset + length].decode("latin-1").strip(" \x00") or None
            )
        offset += length
    return fields if complete and offset == end else None


def _inflated(encoded: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded, _DEFLATED_HEADER_BYTES)


def failure(status: DimseStatus, comment: str) -> Outcome:
    return int(status), comment[:64]


class IncomingInstance:
    """One C-STORE's dataset on its way to the spool.

    ``write`` takes the fragments as they arrive; ``finish`` checks the header against the
    request, applies the duplicates policy, files the instance durably and queues it for
    the index, and returns the status to answer with. A failed write is answered 0xA700
    after the rest of the dataset has been read (and dropped).
    """

    def __init__(
        self,
        context: ReceiverContext,
        state: AssociationState,
        request: Command,
        transfer_syntax: UID,
    ) -> None:
        self.context = context
        self.state = state
        self.request = request
        self.transfer_syntax = transfer_syntax
        self.head = bytearray()
        self.size = 0
        self.refusal: Outcome | None = None
        self.file: IncomingFile | None = None
        self.meta_length = 0
        if not (
            is_valid_uid(request.affected_sop_class_uid)
            and is_valid_uid(request.affected_sop_instance_uid)
        ):
            self.refusal = failure(
                DimseStatus.CANNOT_UNDERSTAND, "Affected SOP Class/Instance UID invalid"
            )
            return
        if context.watermark is not None and context.watermark.paused():
            # Logged once when receiving paused, not for each instance refused.
            self.refusal = LOW_DISK
            return
        meta = encode_file_meta(
            request.affected_sop_class_uid,
            request.affected_sop_instance_uid,
            str(transfer_syntax),
            state.calling_ae_title,
        )
        self.meta_length = len(meta)
        try:
            self.file = context.spool.incoming()
            self.file.write(meta)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        log.error("C-STORE failed: cannot write to the spool", error=str(exc))
        self.refusal = failure(DimseStatus.OUT_OF_RESOURCES, "Cannot write the instance to storage")
        self._drop_file()

    def _drop_file(self) -> None:
        if self.file is not None:
            self.file.discard()
            self.file = None

    def write(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        if len(self.head) < HEAD_BYTES:
            self.head += fragment[: HEAD_BYTES - len(self.head)]
        if self.file is not None:
            try:
                self.file.write(fragment)
            except OSError as exc:
                self._write_failed(exc)

    def abandon(self) -> None:
        """The association ended before the last fragment: nothing of it is kept."""
        self._drop_file()

    def finish(self) -> Outcome:
        try:
            outcome = self._finish()
        finally:
            self._drop_file()
        if outcome[0] == DimseStatus.SUCCESS:
            self.state.instances_received += 1
        else:
            self.state.instances_failed += 1
        return outcome

    def _fields(self) -> Fields:
        syntax = self.transfer_syntax
        if syntax.is_little_endian and syntax != DeflatedExplicitVRLittleEndian:
            complete = self.size <= len(self.head)
            fields = scan_index_fields(self.head, syntax.is_implicit_VR, complete)
            if fields is not None:
                return fields
        header = self._header()
        return {keyword: header_text(header, keyword) for keyword in _INDEXED_TAGS.values()}

    def _header(self) -> Dataset:
        complete = self.size <= len(self.head)
        deflated = self.transfer_syntax == DeflatedExplicitVRLittleEndian
        reader = _HeaderReader(self.transfer_syntax)
        try:
            head = _inflated(bytes(self.head)) if deflated else self.head
            header = reader.read(BytesIO(head))
            if reader.reached_last_tag or complete:
                return header
        except Exception:
            if complete or self.file is None:
                raise
        # The header runs past the bytes kept in memory: read it from the file.
        assert self.file is not None
        with self.file.open_for_reading() as stream:
            stream.seek(self.meta_length)
            if deflated:
                return reader.read(BytesIO(_inflated(stream.read(_DEFLATED_HEADER_BYTES * 16))))
            return reader.read(stream)

    def _finish(self) -> Outcome:
        if self.refusal is LOW_DISK:
            log.debug("C-STORE refused", reason=LOW_DISK[1])
            return LOW_DISK
        if self.refusal is not None:
            log.warning("C-STORE refused", reason=self.refusal[1])
            return self.refusal
        request = self.request
        try:
            fields = self._fields()
            sop_class_uid = fields["SOPClassUID"]
            sop_instance_uid = fields["SOPInstanceUID"]
        except Exception as exc:
            log.warning("C-STORE refused: header not parseable", error=str(exc)[:200])
            return failure(DimseStatus.CANNOT_UNDERSTAND, "Cannot parse the data set")
        if not is_valid_uid(sop_class_uid):
            log.warning("C-STORE refused: SOP Class UID missing or invalid")
            return failure(DimseStatus.CANNOT_UNDERSTAND, "SOP Class UID missing or invalid")
        if sop_class_uid != request.affected_sop_class_uid:
            log.warning("C-STORE refused: SOP class differs from the request")
            return failure(
                DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from request"
            )
        if sop_instance_uid != request.affected_sop_instance_uid:
            log.warning("C-STORE refused: SOP instance UID differs from the request")
            return failure(
                DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID differs from request",
            )
        try:
            key = InstanceKey.checked(
                fields["StudyInstanceUID"], fields["SeriesInstanceUID"], sop_instance_uid
            )
        except InvalidUIDError as exc:
            log.warning("C-STORE refused: invalid UID", reason=str(exc))
            return failure(DimseStatus.CANNOT_UNDERSTAND, str(exc).split(":")[0])
        return self._file(key, fields)

    def _file(self, key: InstanceKey, fields: Fields) -> Outcome:
        context = self.context
        policy = context.settings.duplicate_policy
        duplicate = context.spool.exists(key)
        if duplicate and policy is not DuplicatePolicy.OVERWRITE:
            if policy is DuplicatePolicy.REJECT:
                log.info(
                    "C-STORE refused: duplicate SOP instance", sop_instance_uid=key.sop_instance_uid
                )
                return failure(DimseStatus.CANNOT_UNDERSTAND, "Duplicate SOP Instance refused")
            log.info("duplicate SOP instance ignored", sop_instance_uid=key.sop_instance_uid)
            return SUCCESS
        assert self.file is not None
        incoming, self.file = self.file, None
        try:
            path, size = incoming.commit(key)
        except OSError as exc:
            self._write_failed(exc)
            assert self.refusal is not None
            return self.refusal
        if duplicate:
            log.info("duplicate SOP instance overwritten", sop_instance_uid=key.sop_instance_uid)
        self.state.bytes_received += self.size
        context.index(
            InstanceStored.from_fields(
                key,
                fields,
                sop_class_uid=self.request.affected_sop_class_uid,
                transfer_syntax_uid=str(self.transfer_syntax),
                path=path,
                size_bytes=size,
                received_at=dt.datetime.now(dt.UTC),
                association_id=self.state.association_id,
            )
        )
        return SUCCESS
