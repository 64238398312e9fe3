"""The spool: received instances as DICOM files, written atomically and durably.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Only
valid DICOM UIDs ever become path components, so a dataset cannot steer a write
outside the spool.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import validate_value

from dicom_node.security.crypto import DecryptingReader, EncryptingWriter, load_keys, read_dicom
from dicom_node.security.keys import KeyRing
from processors.errors import BadInputError

if TYPE_CHECKING:
    from dicom_node.config import Settings

SPOOL_SUFFIX = ".dcm"
INCOMING_DIR = ".incoming"
INCOMING_PREFIX = ".incoming-"
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
# Tags needed to index an instance; reading stops before anything larger.
INDEX_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyDate",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
)
_INDEX_TAG_VALUES = [Tag(keyword) for keyword in INDEX_TAGS]


IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1433.1"
IMPLEMENTATION_VERSION_NAME = "DICOMNODE_01"
PREAMBLE = b"\x00" * 128 + b"DICM"


class InvalidUIDError(BadInputError):
    """A UID that is missing or not a valid DICOM UID."""


def is_valid_uid(value: object) -> bool:
    """A non-empty string that pydicom's UI validator accepts (PS3.5 9.1: dot-separated
    decimal components without leading zeros, at most 64 characters).

    Not ``pydicom.uid.UID.is_valid``: its pattern ends in ``$``, which also matches before
    a final newline, so it accepts ``"1.2\n"``.
    """
    if not isinstance(value, str) or not value:
        return False
    try:
        validate_value("UI", value, config.RAISE)
    except ValueError:
        return False
    return True


def require_uid(name: str, value: object) -> str:
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUIDError(f"{name} is not a valid DICOM UID: {shown}")
    return str(value)


@dataclass(frozen=True)
class InstanceKey:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def checked(cls, study: object, series: object, sop_instance: object) -> InstanceKey:
        return cls(
            require_uid("StudyInstanceUID", study),
            require_uid("SeriesInstanceUID", series),
            require_uid("SOPInstanceUID", sop_instance),
        )


class Spool:
    """``keys``: files are written encrypted (``dicom_node.security.crypto``); read either way."""

    def __init__(self, root: Path, *, fsync: bool = True, keys: KeyRing | None = None) -> None:
        self.root = root
        self.fsync = fsync
        self.keys = keys
        self._known_dirs: set[Path] = set()
        self._unnamed_files_work = True
        self._incoming_class = IncomingFile if keys is None else EncryptedIncomingFile

    @classmethod
    def for_settings(cls, settings: Settings) -> Spool:
        """The node's spool: its folder, fsync and encryption as configured."""
        keys = load_keys(settings.spool_encryption_key_file)
        return cls(settings.spool_dir, fsync=settings.fsync, keys=keys)

    def path_for(self, key: InstanceKey) -> Path:
        return (
            self.root
            / key.study_instance_uid
            / key.series_instance_uid
            / f"{key.sop_instance_uid}{SPOOL_SUFFIX}"
        )

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created = []
        for parent in (directory.parent, directory):
            if not parent.exists():
                parent.mkdir(parents=True, exist_ok=True)
                created.append(parent)
        if self.fsync:
            for parent in created:
                _fsync_directory(parent.parent)
        self._known_dirs.add(directory)

    def incoming(self) -> IncomingFile:
        """A file to stream an instance into before its UIDs are known; ``commit`` files it
        under them. On Linux it is an unnamed ``O_TMPFILE`` in the spool (nothing to clean
        up after a crash, no rename); elsewhere a temp file in ``<spool>/.incoming``."""
        if self.root not in self._known_dirs:
            self.root.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(self.root)
        if _O_TMPFILE and self._unnamed_files_work:
            try:
                handle = os.open(self.root, _O_TMPFILE | os.O_RDWR, 0o644)
                return self._incoming_class(self, handle, None)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._unnamed_files_work = False
        directory = self.root / INCOMING_DIR
        if directory not in self._known_dirs:
            directory.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(directory)
        handle, temp_name = tempfile.mkstemp(prefix=INCOMING_PREFIX, dir=directory)
        return self._incoming_class(self, handle, Path(temp_name))

    def write(self, key: InstanceKey, chunks: Iterable[bytes]) -> tuple[Path, int]:
        """Write a file atomically: temp file, fsync, rename, fsync the directory.

        Returns the final path and its size. When this returns, the file survives a crash.
        """
        incoming = self.incoming()
        try:
            for chunk in chunks:
                incoming.write(chunk)
        except BaseException:
            incoming.discard()
            raise
        return incoming.commit(key)

    def file_under(self, incoming: IncomingFile, key: InstanceKey) -> Path:
        """Give a complete, fsync'd incoming file ``key``'s path; fsync its directory."""
        final = self.path_for(key)
        try:
            self._file_under(incoming, final)
        except FileNotFoundError:  # retention removed its (empty) folders since we made them
            self._known_dirs.discard(final.parent)
            self._file_under(incoming, final)
        return final

    def _file_under(self, incoming: IncomingFile, final: Path) -> None:
        self._ensure_dir(final.parent)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            if incoming.path is not None:
                os.replace(incoming.path, final.name, dst_dir_fd=directory)
            else:
                _link_unnamed(incoming.fileno, directory, final.name)
            if self.fsync:
                os.fsync(directory)
        finally:
            os.close(directory)

    def exists(self, key: InstanceKey) -> bool:
        return self.path_for(key).exists()

    def iter_files(self) -> Iterator[Path]:
        """Every complete spooled file (temp files from interrupted writes are skipped)."""
        if not self.root.exists():
            return
        for study_dir in sorted(self.root.iterdir()):
            if not study_dir.is_dir() or study_dir.name.startswith("."):
                continue
            for series_dir in sorted(study_dir.iterdir()):
                if not series_dir.is_dir():
                    continue
                for path in sorted(series_dir.iterdir()):
                    if path.suffix == SPOOL_SUFFIX and not path.name.startswith("."):
                        yield path

    def remove_stale_temp_files(self, older_than: float | None = None) -> int:
        """Delete named temp files of interrupted writes (those last written before
        ``older_than``, a time.time(), when receivers may be writing already)."""
        removed = 0
        if not self.root.exists():
            return removed
        stale = [*self.root.glob(f"*/*/{INCOMING_PREFIX}*"), *self.root.glob(f"{INCOMING_DIR}/*")]
        for path in stale:
            try:
                if older_than is not None and path.stat().st_mtime >= older_than:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed


class IncomingFile:
    """An instance being received: written as it arrives, filed by ``commit``.

    ``path`` is None for an unnamed (``O_TMPFILE``) file.
    """

    def __init__(self, spool: Spool, handle: int, path: Path | None) -> None:
        self.spool = spool
        self.path = path
        self.fileno = handle
        self.size = 0
        self._written_back = 0
        self._stream = os.fdopen(handle, "r+b" if path is None else "wb", buffering=0)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self._stream.write(view) or 0
            view = view[written:]
            self.size += written
        if self.spool.fsync and self.size - self._written_back >= WRITEBACK_BYTES:
            _start_writeback(self.fileno, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def open_for_reading(self) -> BinaryIO:
        """The file as written so far, from the start, with an offset of its own."""
        return open(f"/proc/self/fd/{self.fileno}" if self.path is None else self.path, "rb")

    def commit(self, key: InstanceKey) -> tuple[Path, int]:
        """fsync, name it after ``key``, fsync the directory: then it survives a crash."""
        try:
            if self.spool.fsync:
                os.fsync(self.fileno)
            final = self.spool.file_under(self, key)
        except BaseException:
            self.discard()
            raise
        self._stream.close()
        return final, self.size

    def discard(self) -> None:
        self._stream.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class EncryptedIncomingFile(IncomingFile):
    """An incoming file written encrypted as it arrives (``spool.keys`` set); ``size``
    counts plaintext bytes, as the sender sent them."""

    def __init__(self, spool: Spool, handle: int, path: Path | None) -> None:
        super().__init__(spool, handle, path)
        assert spool.keys is not None
        try:
            self._encrypting = EncryptingWriter(self._stream, spool.keys)
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes | memoryview) -> None:
        self.size += self._encrypting.write(data)
        unsynced = self._encrypting.written - self._written_back
        if self.spool.fsync and unsynced >= WRITEBACK_BYTES:
            _start_writeback(self.fileno, self._written_back, unsynced)
            self._written_back += unsynced

    def open_for_reading(self) -> BinaryIO:
        """The plaintext, from the start. Reading finishes the file: only ``commit`` or
        ``discard`` may follow (the last segment is sealed; nothing more can be written)."""
        self._encrypting.finish()
        reader = DecryptingReader(super().open_for_reading(), self.spool.keys, "incoming instance")
        return reader.as_binary_file()

    def commit(self, key: InstanceKey) -> tuple[Path, int]:
        try:
            self._encrypting.finish()
        except BaseException:
            self.discard()
            raise
        return super().commit(key)


WRITEBACK_BYTES = 256 * 1024
"""The disk starts writing an incoming file every this many bytes, while the rest of it
is still arriving: the fsync before the response then waits for less (about 0.6 ms
less per 0.5 MB instance on this project's VM)."""
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def _start_writeback(fileno: int, offset: int, length: int) -> None:
    """Start writing a range of a file to disk without waiting (Linux sync_file_range)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fileno, offset, length, _SYNC_FILE_RANGE_WRITE)


def _link_unnamed(fileno: int, directory: int, name: str) -> None:
    """Name an ``O_TMPFILE`` file ``name`` in ``directory``, replacing what is there.

    ``dst_dir_fd`` makes Python call linkat() with AT_SYMLINK_FOLLOW, which follows the
    /proc link to the open file (plain link() would not).
    """
    source = f"/proc/self/fd/{fileno}"
    try:
        os.link(source, name, dst_dir_fd=directory, follow_symlinks=True)
    except FileExistsError:  # a duplicate overwritten: link beside it, rename over it
        beside = f"{INCOMING_PREFIX}{os.getpid()}-{fileno}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(beside, dir_fd=directory)
        os.link(source, beside, dst_dir_fd=directory, follow_symlinks=True)
        os.replace(beside, name, src_dir_fd=directory, dst_dir_fd=directory)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def header_text(header: Dataset, keyword: str) -> str | None:
    """A header value as text, straight from the raw bytes.

    pydicom's ``Dataset.get`` converts and validates each element under its process-wide
    validation mode: that cost more than writing the file, and a strict mode would refuse
    what the sender wrote. The index needs short ASCII strings (UIDs, codes, numbers).
    """
    element = header.get_item(keyword)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip(" \x00")
    elif value is None:
        return None
    else:
        text = str(value).strip()
    return text or None


def read_index_fields(path: Path, keys: KeyRing | None = None) -> dict[str, str | None]:
    """The header fields the index needs, as written, read without the pixel data
    (decrypting only the segments the header is in)."""
    dataset = read_dicom(path, keys, stop_before_pixels=True, specific_tags=_INDEX_TAG_VALUES)
    fields = {keyword: header_text(dataset, keyword) for keyword in INDEX_TAGS}
    fields["TransferSyntaxUID"] = header_text(dataset.file_meta, "TransferSyntaxUID")
    return fields


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str
) -> bytes:
    """The File Meta Information group (PS3.10 7.1), preamble and prefix included.

    Written by hand because pydicom's general encoder costs more than the rest of a
    C-STORE on the receive path; ``tests/dicom_node/test_storage.py`` checks it against
    pydicom.
    """
    body = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _element(0x0002, 0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
            _element(0x0002, 0x0016, b"AE", _padded(source_ae_title.strip() or "UNKNOWN", b" ")),
        )
    )
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return PREAMBLE + group_length + body
