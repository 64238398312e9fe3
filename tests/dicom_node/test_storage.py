from __future__ import annotations

import copy
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydicom import config, dcmread
from pydicom.config import disable_value_validation, strict_reading
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from dicom_node.security.crypto import MAGIC, EncryptedFileError, open_data_file, save_dataset
from dicom_node.security.keys import KeyFileError, KeyRing, write_key_file
from dicom_node.storage import (
    InstanceKey,
    InvalidUIDError,
    Spool,
    encode_file_meta,
    is_valid_uid,
    read_index_fields,
)
from dicom_node.testing import local_settings


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.1.2", "0.1", "2.25.329800735698586629295641978511506172918", "1.2.0.3"]
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1.02.3",
        "1..2",
        ".1.2",
        "1.2.",
        "1.2.a",
        "../../etc/passwd",
        "1.2/3",
        "1.2 ",
        "1.2\n",
        "1.2\n3",
        "\u0661.2",
        b"1.2",
        None,
        12,
        "1." + "2" * 63,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=8))
def test_generated_uids_are_valid_and_path_safe(components: list[int]) -> None:
    uid = ".".join(map(str, components))
    if len(uid) <= 64:
        assert is_valid_uid(uid)
        assert "/" not in uid and ".." not in uid


UID_LIKE_TEXT = st.text(alphabet="0123456789./\n\\\x00 a\u0661", max_size=70)


@given(st.text(max_size=70) | UID_LIKE_TEXT)
@example("1.2\n")
def test_anything_accepted_is_path_safe(text: str) -> None:
    if is_valid_uid(text):
        assert set(text) <= set("0123456789.")
        assert ".." not in text and not text.startswith(".")


def pydicom_accepts_uid(text: str) -> bool:
    try:
        validate_value("UI", text, config.RAISE)
    except ValueError:
        return False
    return True


@given(st.text(max_size=70) | UID_LIKE_TEXT)
@example("1.2\n")
def test_uid_check_is_pydicoms_validator_less_the_empty_value(text: str) -> None:
    assert is_valid_uid(text) == (text != "" and pydicom_accepts_uid(text))


def test_key_refuses_invalid_uid() -> None:
    with pytest.raises(InvalidUIDError, match="StudyInstanceUID"):
        InstanceKey.checked("1.2/../3", "1.2.3", "1.2.4")


def test_atomic_write_and_layout(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    key = InstanceKey.checked("1.2.3", "1.2.3.4", "1.2.3.4.5")
    path, size = spool.write(key, [b"abc", b"def"])
    assert path == tmp_path / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"abcdef" and size == 6
    assert spool.exists(key)
    assert list(spool.iter_files()) == [path]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    key = InstanceKey.checked("1.2.3", "1.2.3.4", "1.2.3.4.5")

    def chunks_until_the_disk_fills() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        spool.write(key, chunks_until_the_disk_fills())
    assert not spool.exists(key)
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temp file"])
def test_incoming_file_streams_then_files_under_its_key(tmp_path: Path, unnamed: bool) -> None:
    """An instance is written as it arrives, before its UIDs are known, then filed; a
    second one with the same key replaces it (the overwrite policy)."""
    spool = Spool(tmp_path / "spool")
    spool._unnamed_files_work = unnamed
    key = InstanceKey.checked("1.2.3", "1.2.3.4", "1.2.3.4.5")
    for content in (b"headtail", b"second"):
        incoming = spool.incoming()
        assert (incoming.path is None) == unnamed
        incoming.write(content[:4])
        incoming.write(memoryview(b"--" + content[4:])[2:])
        with incoming.open_for_reading() as stream:
            assert stream.read() == content
        assert spool.exists(key) == (content == b"second")  # never a half-written instance
        path, size = incoming.commit(key)
        assert path == spool.path_for(key) and path.read_bytes() == content
        assert size == len(content)
        assert [p for p in spool.root.rglob("*") if p.is_file()] == [path]


def test_stale_temp_files_are_removed_and_not_listed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    key = InstanceKey.checked("1.2.3", "1.2.3.4", "1.2.3.4.5")
    spool.write(key, [b"x"])
    stale = spool.path_for(key).parent / ".incoming-abc"
    stale.write_bytes(b"half")
    assert list(spool.iter_files()) == [spool.path_for(key)]
    spool._unnamed_files_work = False  # an O_TMPFILE leaves nothing behind to remove
    interrupted = spool.incoming()
    interrupted.write(b"half an instance")
    assert list(spool.iter_files()) == [spool.path_for(key)]
    assert spool.remove_stale_temp_files() == 2
    assert interrupted.path is not None and not interrupted.path.exists()
    assert not stale.exists()


@pytest.mark.parametrize("ae_title", ["STORESCU", "ODD", ""])
def test_file_meta_encoding_matches_pydicom(small_ct, ae_title: str) -> None:  # type: ignore[no-untyped-def]
    dataset = small_ct.datasets[0]
    sop_instance = str(generate_uid())
    meta = encode_file_meta(str(dataset.SOPClassUID), sop_instance, "1.2.840.10008.1.2.1", ae_title)
    buffer = BytesIO()
    dataset.save_as(buffer, implicit_vr=False, little_endian=True)
    body = buffer.getvalue()
    parsed = dcmread(BytesIO(meta + body[body.index(b"\x08\x00") :]), force=True)
    file_meta = parsed.file_meta
    assert file_meta.MediaStorageSOPClassUID == dataset.SOPClassUID
    assert file_meta.MediaStorageSOPInstanceUID == sop_instance
    assert file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert file_meta.FileMetaInformationVersion == b"\x00\x01"
    assert file_meta.SourceApplicationEntityTitle == (ae_title or "UNKNOWN")
    assert file_meta.FileMetaInformationGroupLength == len(meta) - 132 - 12


def test_read_index_fields(tmp_path: Path, small_ct) -> None:  # type: ignore[no-untyped-def]
    path = small_ct.write(tmp_path)[0]
    fields = read_index_fields(path)
    assert fields["SOPInstanceUID"] == small_ct.datasets[0].SOPInstanceUID
    assert fields["Modality"] == "CT"
    assert fields["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"


def test_read_index_fields_takes_values_as_written(tmp_path: Path, small_ct) -> None:  # type: ignore[no-untyped-def]
    """Reconcile indexes what the spool holds, invalid values included, whatever pydicom's
    process-wide validation mode is: the index reads the raw elements."""
    dataset = copy.deepcopy(small_ct.datasets[0])
    path = tmp_path / "invalid.dcm"
    with disable_value_validation():  # written as a careless sender would
        dataset["SeriesNumber"] = DataElement("SeriesNumber", "IS", "0000000000000007")
        dataset["StudyDate"] = DataElement("StudyDate", "DA", "2023-13-45")
        dataset.save_as(path, enforce_file_format=True)
    with strict_reading():
        fields = read_index_fields(path)
    assert (fields["SeriesNumber"], fields["StudyDate"]) == ("0000000000000007", "2023-13-45")
    assert fields["TransferSyntaxUID"] == dataset.file_meta.TransferSyntaxUID


@pytest.mark.parametrize(
    ("fsync", "expected"), [(True, [(0, 256 * 1024), (256 * 1024, 256 * 1024)]), (False, [])]
)
def test_writeback_starts_while_the_instance_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool, expected: list[tuple[int, int]]
) -> None:
    """Every 256 KiB the disk is told to start writing, so the fsync at the end waits less;
    without fsync there is nothing to hurry."""
    from dicom_node import storage

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(
        storage, "_start_writeback", lambda _fd, at, size: started.append((at, size))
    )
    incoming = Spool(tmp_path / "spool", fsync=fsync).incoming()
    for _ in range(9):
        incoming.write(b"x" * (64 * 1024))
    assert started == expected
    incoming.discard()


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named temp file"])
def test_an_encrypted_spool_writes_each_instance_encrypted_as_it_arrives(
    tmp_path: Path, unnamed: bool
) -> None:
    keys = KeyRing.generate()
    spool = Spool(tmp_path / "spool", keys=keys)
    spool._unnamed_files_work = unnamed
    key = InstanceKey.checked("1.2.3", "1.2.3.4", "1.2.3.4.5")
    content = b"DICM PATIENT^NAME " * 10_000
    incoming = spool.incoming()
    for start in range(0, len(content), 4096):
        incoming.write(memoryview(content)[start : start + 4096])
    with incoming.open_for_reading() as stream:  # the handler's header read, from the file
        stream.seek(5)
        assert stream.read(7) == b"PATIENT"
    path, size = incoming.commit(key)
    assert size == len(content)
    stored = path.read_bytes()
    assert stored.startswith(MAGIC) and b"PATIENT" not in stored and b"DICM" not in stored
    with open_data_file(path, keys) as stream:
        assert stream.read() == content
    assert [p for p in spool.root.rglob("*") if p.is_file()] == [path]


def test_an_encrypted_instance_is_complete_on_disk_when_it_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last segment is sealed before the fsync that precedes the acknowledgement: the
    file the sender hears about is whole, as in clear."""
    import os

    spool = Spool(tmp_path / "spool", keys=KeyRing.generate())
    incoming = spool.incoming()
    incoming.write(b"x" * 100_000)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path, _ = incoming.commit(InstanceKey.checked("1.2.3", "1.2.3.4", "1.2.3.4.5"))
    assert synced[0] == path.stat().st_size  # the file's fsync, then its directory's
    assert len(synced) >= 2


def test_read_index_fields_of_an_encrypted_file(tmp_path: Path, small_ct) -> None:  # type: ignore[no-untyped-def]
    keys = KeyRing.generate()
    path = tmp_path / "encrypted.dcm"
    save_dataset(small_ct.datasets[0], path, keys)
    fields = read_index_fields(path, keys)
    assert fields["SOPInstanceUID"] == small_ct.datasets[0].SOPInstanceUID
    assert fields["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    with pytest.raises(EncryptedFileError, match="no key file is configured"):
        read_index_fields(path)


def test_the_spool_of_settings_with_a_key_file_encrypts(tmp_path: Path) -> None:
    write_key_file(tmp_path / "key", [KeyRing.generate().keys[0]])
    encrypted = local_settings(tmp_path, spool_encryption_key_file=tmp_path / "key")
    assert Spool.for_settings(encrypted).keys == KeyRing.from_file(tmp_path / "key")
    assert Spool.for_settings(local_settings(tmp_path)).keys is None
    missing = local_settings(tmp_path, spool_encryption_key_file=tmp_path / "absent")
    with pytest.raises(KeyFileError, match="key file not found"):
        Spool.for_settings(missing)
