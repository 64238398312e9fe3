"""Encryption at rest: the one file API through which the node reads and writes its data folder.

With ``spool_encryption_key_file`` set, every file the node writes under its data folder
(received instances, outputs) is AES-256-GCM under a random data key of its own, and that
key is sealed by the key ring's current key (``dicom_node.security.keys``): rotating the
key file keeps older files readable as long as their key stays in it.

The format streams, so an instance is encrypted as it arrives and read back a piece at a
time (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, 2015)::

    magic (8) | version (1) | segment size (4) | nonce prefix (7) | sealed key length (2)
    | sealed data key (KeyRing.seal, the 22 bytes before it as associated data)
    | segment 0 | segment 1 | ... | last segment

Each segment is ``SEGMENT_BYTES`` of plaintext (the last one 0 to ``SEGMENT_BYTES``)
sealed with AES-GCM under the data key, 16 bytes of tag added. Its nonce is the file's
random prefix, the segment's number (4 bytes, big endian) and a byte that is 1 for the
last segment only: a segment moved, dropped, or cut off at the end of the file fails its
tag, and so does any altered byte. The header is bound by the seal's associated data.

Files without the magic are read as they are, so turning encryption on leaves what was
written before it readable.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicom_node.security.keys import KEY_BYTES, DecryptionError, KeyRing

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from pydicom.dataset import Dataset

MAGIC = b"\x89DNENC\r\n"
VERSION = 1
SEGMENT_BYTES = 64 * 1024
TAG_BYTES = 16
NONCE_PREFIX_BYTES = 7
_FIXED_HEADER = struct.Struct(">8sBI7sH")
_SEAL_PURPOSE = b"dicom-node data file key"
_MAX_SEGMENTS = 1 << 32

Bytes = bytes | bytearray | memoryview


class EncryptedFileError(DecryptionError):
    """An encrypted file that cannot be read: no key file, a key it lacks, or altered data."""


def load_keys(key_file: Path | None) -> KeyRing | None:
    """The key ring of ``spool_encryption_key_file``; None when encryption is off."""
    return None if key_file is None else KeyRing.from_file(key_file)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _write_all(sink: BinaryIO, data: Bytes) -> None:
    view = memoryview(data)
    while view:
        written = sink.write(view) or 0
        view = view[written:]


class EncryptingWriter:
    """Encrypts what is written to ``sink`` a segment at a time; ``finish`` seals the last.

    Memory holds at most one segment of plaintext whatever the file's size. ``size`` counts
    the plaintext written, ``written`` the bytes that went to ``sink``.
    """

    def __init__(self, sink: BinaryIO, keys: KeyRing) -> None:
        self.sink = sink
        data_key = secrets.token_bytes(KEY_BYTES)
        self._prefix = os.urandom(NONCE_PREFIX_BYTES)
        self._aead = AESGCM(data_key)
        self._pending = bytearray()
        self._index = 0
        self.size = 0
        self.finished = False
        fixed = _FIXED_HEADER.pack(MAGIC, VERSION, SEGMENT_BYTES, self._prefix, 0)
        sealed = keys.seal(data_key, fixed[:-2] + _SEAL_PURPOSE)
        header = fixed[:-2] + len(sealed).to_bytes(2, "big") + sealed
        _write_all(sink, header)
        self.written = len(header)

    def write(self, data: Bytes) -> int:
        if self.finished:
            raise ValueError("the encrypted file is finished: nothing more can be written")
        view = memoryview(data).cast("B")
        count = len(view)
        while view:
            if len(self._pending) == SEGMENT_BYTES:  # full, and more follows: not the last
                self._seal(last=False)
            take = SEGMENT_BYTES - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
        self.size += count
        return count

    def finish(self) -> None:
        """Seal the last segment (empty for an empty file). Writing after it is an error."""
        if not self.finished:
            self._seal(last=True)
            self.finished = True

    def _seal(self, last: bool) -> None:
        if self._index >= _MAX_SEGMENTS:
            raise ValueError("a file this large cannot be encrypted (2**32 segments at most)")
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last), self._pending, None)
        _write_all(self.sink, sealed)
        self.written += len(sealed)
        self._index += 1
        self._pending.clear()


@dataclass(frozen=True)
class _Layout:
    """Where an encrypted file's segments are, and its plaintext size, from its header."""

    prefix: bytes
    segment_bytes: int
    data_start: int
    segments: int
    size: int

    @classmethod
    def of(cls, fixed: bytes, file_size: int, where: str) -> _Layout:
        if len(fixed) < _FIXED_HEADER.size or not fixed.startswith(MAGIC):
            raise EncryptedFileError(f"{where}: not a file encrypted by this node")
        fields: tuple[bytes, int, int, bytes, int] = _FIXED_HEADER.unpack(fixed)
        _, version, segment_bytes, prefix, sealed_length = fields
        if version != VERSION or segment_bytes == 0:
            raise EncryptedFileError(f"{where}: encrypted in an unknown format (version {version})")
        data_start = _FIXED_HEADER.size + sealed_length
        stored = file_size - data_start
        sealed_segment = segment_bytes + TAG_BYTES
        segments = max(1, -(-stored // sealed_segment))
        if stored - (segments - 1) * sealed_segment < TAG_BYTES:
            raise EncryptedFileError(f"{where}: truncated (its last segment is cut off)")
        return cls(prefix, segment_bytes, data_start, segments, stored - segments * TAG_BYTES)


class DecryptingReader(io.RawIOBase):
    """A seekable view of an encrypted file's plaintext; reads decrypt only the segments
    they touch (the last one kept). Takes ownership of ``source`` (a seekable file).

    The plaintext size comes from the file's size, so seeking to the end decrypts nothing.
    A read returns all it asks for unless the end comes first. It has no ``name``, so that
    pydicom never reopens the file by name to read a value (it would read ciphertext).
    """

    def __init__(self, source: BinaryIO, keys: KeyRing | None, description: str) -> None:
        super().__init__()
        self._source = source
        self._description = description
        try:
            self._open(keys)
        except BaseException:
            source.close()
            raise
        self._position = 0
        self._cached_index = -1
        self._cached = b""
        self.segments_decrypted = 0

    def _open(self, keys: KeyRing | None) -> None:
        where = self._description
        source = self._source
        source.seek(0)
        fixed = source.read(_FIXED_HEADER.size)
        layout = _Layout.of(fixed, os.fstat(source.fileno()).st_size, where)
        if keys is None:
            raise EncryptedFileError(
                f"{where} is encrypted and no key file is configured (spool_encryption_key_file)"
            )
        sealed = source.read(layout.data_start - _FIXED_HEADER.size)
        try:
            data_key = keys.open(sealed, fixed[:-2] + _SEAL_PURPOSE)
        except DecryptionError as exc:
            raise EncryptedFileError(f"{where}: cannot open its data key: {exc}") from None
        self._aead = AESGCM(data_key)
        self._prefix = layout.prefix
        self._segment_bytes = layout.segment_bytes
        self._data_start = layout.data_start
        self._segments = layout.segments
        self._size = layout.size

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target) and self._position < self._size:
            index, start = divmod(self._position, self._segment_bytes)
            segment = self._segment(index)
            piece = segment[start : start + len(target) - filled]
            target[filled : filled + len(piece)] = piece
            filled += len(piece)
            self._position += len(piece)
        return filled

    def _segment(self, index: int) -> bytes:
        if index != self._cached_index:
            sealed_segment = self._segment_bytes + TAG_BYTES
            self._source.seek(self._data_start + index * sealed_segment)
            sealed = self._source.read(sealed_segment)
            last = index == self._segments - 1
            try:
                self._cached = self._aead.decrypt(_nonce(self._prefix, index, last), sealed, None)
            except InvalidTag:
                raise EncryptedFileError(
                    f"{self._description}: segment {index} was altered, moved or cut off"
                ) from None
            self._cached_index = index
            self.segments_decrypted += 1
        return self._cached

    def as_binary_file(self) -> BinaryIO:
        """Itself, typed as the binary file it is (typing's BinaryIO is no base of io's)."""
        return cast(BinaryIO, self)

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def _has_magic(stream: BinaryIO) -> bool:
    found = stream.read(len(MAGIC)) == MAGIC
    stream.seek(0)
    return found


def plaintext_size(path: Path) -> int:
    """The size of ``path``'s plaintext (its own size when it is in clear); needs no key."""
    with open(path, "rb") as source:
        fixed = source.read(_FIXED_HEADER.size)
        file_size = os.fstat(source.fileno()).st_size
    if not fixed.startswith(MAGIC):
        return file_size
    return _Layout.of(fixed, file_size, str(path)).size


def open_data_file(path: Path, keys: KeyRing | None) -> BinaryIO:
    """``path``'s plaintext as a seekable binary file: decrypted when it is encrypted, as it
    is otherwise. Raises ``EncryptedFileError`` when it cannot be decrypted."""
    source = open(path, "rb")  # noqa: SIM115 - the caller closes what this returns
    try:
        encrypted = _has_magic(source)
    except BaseException:
        source.close()
        raise
    if not encrypted:
        return source
    return DecryptingReader(source, keys, str(path)).as_binary_file()


def read_dicom(path: Path, keys: KeyRing | None, **options: object) -> Dataset:
    """``pydicom.dcmread`` of a data-folder file; ``options`` are dcmread's, but not
    ``defer_size`` (a deferred value would be read from the file without decrypting)."""
    if "defer_size" in options:
        raise TypeError("read_dicom reads every value: defer_size is not supported")
    from pydicom import dcmread  # here: `serve` checks the key file before pydicom loads

    with open_data_file(path, keys) as stream:
        return dcmread(stream, **options)  # type: ignore[arg-type]


def write_data_file(path: Path, data: Bytes, keys: KeyRing | None) -> None:
    """Write ``data`` to a new ``path``, encrypted when ``keys`` is given."""
    with open(path, "wb") as sink:
        if keys is None:
            _write_all(sink, data)
            return
        writer = EncryptingWriter(sink, keys)
        writer.write(data)
        writer.finish()


def save_dataset(dataset: Dataset, path: Path, keys: KeyRing | None) -> None:
    """Write ``dataset`` as a DICOM file (PS3.10) at ``path``, encrypted when ``keys`` is given.

    Encrypted, the file is encoded in memory first: pydicom seeks back to fill in lengths,
    which a stream of sealed segments cannot take. Outputs (SEG, SR, one derived slice) are
    small; received instances, which can be large, stream through ``EncryptingWriter``.
    """
    if keys is None:
        dataset.save_as(path, enforce_file_format=True)
        return
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_data_file(path, buffer.getbuffer(), keys)
