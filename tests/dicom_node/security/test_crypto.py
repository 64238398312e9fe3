"""The encrypted file format: round trips, random access, tampering, rotation, bounded memory."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.security.crypto import (
    MAGIC,
    SEGMENT_BYTES,
    TAG_BYTES,
    DecryptingReader,
    EncryptedFileError,
    EncryptingWriter,
    open_data_file,
    plaintext_size,
    read_dicom,
    save_dataset,
    write_data_file,
)
from dicom_node.security.keys import KeyRing
from dicom_node.synthetic import generate_series

SEALED = SEGMENT_BYTES + TAG_BYTES


@pytest.fixture(scope="module")
def keys() -> KeyRing:
    return KeyRing.generate()


def header_bytes(path: Path) -> int:
    """Where the first segment starts: the fixed header, then the sealed data key."""
    fixed = path.read_bytes()[:22]
    assert fixed.startswith(MAGIC)
    return 22 + int.from_bytes(fixed[20:22], "big")


def decrypting(path: Path, keys: KeyRing | None) -> DecryptingReader:
    return DecryptingReader(path.open("rb"), keys, path.name)


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT_BYTES - 1, SEGMENT_BYTES, SEGMENT_BYTES + 1, 3 * SEGMENT_BYTES + 5]
)
def test_round_trip(tmp_path: Path, keys: KeyRing, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "file"
    write_data_file(path, data, keys)
    stored = path.read_bytes()
    assert stored.startswith(MAGIC)
    segments = max(1, -(-size // SEGMENT_BYTES))
    assert len(stored) == header_bytes(path) + size + segments * TAG_BYTES
    with open_data_file(path, keys) as stream:
        assert stream.read() == data
    assert plaintext_size(path) == size  # from the header and the file's size, no key
    assert read_through_small_writes(tmp_path, keys, data) == data


def read_through_small_writes(tmp_path: Path, keys: KeyRing, data: bytes) -> bytes:
    """The same bytes written in uneven pieces, as PDUs arrive, read back."""
    path = tmp_path / "pieces"
    with path.open("wb", buffering=0) as sink:
        writer = EncryptingWriter(sink, keys)
        for start in range(0, len(data), 7919):
            writer.write(memoryview(data)[start : start + 7919])
        writer.finish()
        writer.finish()  # finishing twice seals nothing more
        assert writer.size == len(data) and writer.written == path.stat().st_size
        with pytest.raises(ValueError, match="finished"):
            writer.write(b"late")
    with open_data_file(path, keys) as stream:
        return stream.read()


def test_reads_seek_and_decrypt_only_the_segments_they_touch(tmp_path: Path, keys: KeyRing) -> None:
    data = os.urandom(10 * SEGMENT_BYTES + 123)
    path = tmp_path / "file"
    write_data_file(path, data, keys)
    with decrypting(path, keys) as reader:
        assert reader.seek(0, io.SEEK_END) == len(data) and reader.segments_decrypted == 0
        rng = np.random.default_rng(7)
        for offset in rng.integers(0, len(data), 40):
            reader.seek(int(offset))
            assert reader.read(1000) == data[offset : offset + 1000]
        reader.seek(-10, io.SEEK_CUR)
        assert reader.tell() == int(offset) + len(data[offset : offset + 1000]) - 10
        before = reader.segments_decrypted
        reader.seek(5 * SEGMENT_BYTES - 10)
        assert reader.read(20) == data[5 * SEGMENT_BYTES - 10 : 5 * SEGMENT_BYTES + 10]
        assert reader.segments_decrypted - before <= 2
        reader.seek(len(data) + 5)
        assert reader.read(10) == b""
        with pytest.raises(ValueError, match="negative"):
            reader.seek(-1)


def test_a_header_read_of_a_large_encrypted_instance_decrypts_only_its_start(
    tmp_path: Path, keys: KeyRing
) -> None:
    """``stop_before_pixels`` on a 2 MB instance decrypts the segment(s) of its header, not
    the pixel data; a full read gives back exactly the dataset written."""
    dataset = generate_series(num_slices=1, rows=1024, columns=1024, uid_seed="big").datasets[0]
    path = tmp_path / "big.dcm"
    save_dataset(dataset, path, keys)
    assert path.stat().st_size > 30 * SEALED
    with open_data_file(path, keys) as stream:
        header = dcmread(stream, stop_before_pixels=True)
        assert isinstance(stream, DecryptingReader) and stream.segments_decrypted <= 2
    assert header.SOPInstanceUID == dataset.SOPInstanceUID and "PixelData" not in header
    assert read_dicom(path, keys) == dataset


def test_files_written_in_clear_stay_readable_with_encryption_on(
    tmp_path: Path, keys: KeyRing
) -> None:
    dataset = generate_series(num_slices=1, rows=16, columns=16, uid_seed="clear").datasets[0]
    path = tmp_path / "clear.dcm"
    save_dataset(dataset, path, None)
    assert path.read_bytes()[128:132] == b"DICM"
    assert read_dicom(path, keys) == dataset == read_dicom(path, None)
    assert plaintext_size(path) == path.stat().st_size


def tampered(path: Path, change: str, start: int) -> None:
    data = bytearray(path.read_bytes())
    if change == "flip a ciphertext byte":
        data[start + SEALED + 100] ^= 1
    elif change == "flip a tag byte":
        data[start + SEALED - 1] ^= 0x80
    elif change == "swap two segments":
        first, second = data[start : start + SEALED], data[start + SEALED : start + 2 * SEALED]
        data[start : start + 2 * SEALED] = second + first
    elif change == "drop a segment":
        del data[start + SEALED : start + 2 * SEALED]
    elif change == "cut off the last segment":
        del data[start + 3 * SEALED :]
    elif change == "cut the last segment short":
        del data[-5:]
    elif change == "append bytes":
        data += os.urandom(40)
    elif change == "flip a nonce prefix byte":
        data[14] ^= 1
    elif change == "flip a sealed key byte":
        data[start - 20] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "change",
    [
        "flip a ciphertext byte",
        "flip a tag byte",
        "swap two segments",
        "drop a segment",
        "cut off the last segment",
        "cut the last segment short",
        "append bytes",
        "flip a nonce prefix byte",
        "flip a sealed key byte",
    ],
)
def test_tampering_truncation_and_reordering_are_detected(
    tmp_path: Path, keys: KeyRing, change: str
) -> None:
    data = os.urandom(4 * SEGMENT_BYTES + 1000)
    path = tmp_path / "file"
    write_data_file(path, data, keys)
    tampered(path, change, header_bytes(path))
    with pytest.raises(EncryptedFileError) as caught, open_data_file(path, keys) as stream:
        stream.read()
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert any(word in message for word in ("altered", "cut off", "data key", "truncated"))


def test_a_rotated_key_file_reads_old_files_and_writes_under_the_new_key(tmp_path: Path) -> None:
    old, new = KeyRing.generate(), KeyRing.generate()
    rotated = KeyRing((new.keys[0], old.keys[0]))
    write_data_file(tmp_path / "old", b"written under the old key", old)
    write_data_file(tmp_path / "new", b"written after rotation", rotated)
    with open_data_file(tmp_path / "old", rotated) as stream:
        assert stream.read() == b"written under the old key"
    with open_data_file(tmp_path / "new", new) as stream:
        assert stream.read() == b"written after rotation"
    with pytest.raises(EncryptedFileError, match="which the key file lacks"):
        open_data_file(tmp_path / "new", old)


def test_an_encrypted_file_without_a_key_file_is_a_clear_error(
    tmp_path: Path, keys: KeyRing
) -> None:
    path = tmp_path / "1.2.3.dcm"
    write_data_file(path, b"secret", keys)
    with pytest.raises(EncryptedFileError, match="is encrypted and no key file is configured"):
        read_dicom(path, None)
    with pytest.raises(EncryptedFileError, match="which the key file lacks"):
        read_dicom(path, KeyRing.generate())
    with pytest.raises(TypeError, match="defer_size"):
        read_dicom(path, keys, defer_size=100)


def test_streaming_a_large_file_keeps_memory_bounded(tmp_path: Path, keys: KeyRing) -> None:
    """64 MB in 16 KiB pieces, as the receive path writes them, then read back in 1 MiB
    reads: Python's allocations peak at a few segments, not at the file's size."""
    piece = os.urandom(16 * 1024)
    total = 64 * 1024 * 1024
    path = tmp_path / "large"
    tracemalloc.start()
    try:
        with path.open("wb", buffering=0) as sink:
            writer = EncryptingWriter(sink, keys)
            for _ in range(total // len(piece)):
                writer.write(piece)
            writer.finish()
        _, writing_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read = 0
        with open_data_file(path, keys) as stream:
            while chunk := stream.read(1 << 20):
                assert chunk[: len(piece)] == piece
                read += len(chunk)
        _, reading_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert read == total
    assert writing_peak < 4 * SEGMENT_BYTES, writing_peak
    # A read's buffer, its copy as bytes and the previous chunk still held: 3 MiB, not 64.
    assert reading_peak < 4 << 20, reading_peak
