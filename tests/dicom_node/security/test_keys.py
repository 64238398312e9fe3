import binascii
import os
import subprocess
from pathlib import Path

import pytest

from dicom_node.security.keys import (
    DecryptionError,
    KeyFileError,
    KeyRing,
    key_id,
    write_key_file,
)


def test_a_key_file_written_by_openssl_is_read(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(
        subprocess.run(["openssl", "rand", "-base64", "32"], capture_output=True, check=True).stdout
    )
    ring = KeyRing.from_file(path)
    assert len(ring.keys) == 1
    assert ring.open(ring.seal(b"secret")) == b"secret"


def test_sealed_data_stays_readable_after_rotation(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    write_key_file(tmp_path / "old", [old])
    sealed = KeyRing.from_file(tmp_path / "old").seal(b"pseudonym map", b"purpose")
    write_key_file(tmp_path / "rotated", [new, old])
    rotated = KeyRing.from_file(tmp_path / "rotated")
    assert rotated.current_id == key_id(new)
    assert rotated.open(sealed, b"purpose") == b"pseudonym map"
    assert rotated.seal(b"x")[4:12] == key_id(new)


def test_a_key_file_is_private_to_its_owner(tmp_path: Path) -> None:
    write_key_file(tmp_path / "key", [os.urandom(32)])
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600


def test_sealed_data_altered_or_used_for_another_purpose_is_refused() -> None:
    ring = KeyRing.generate()
    sealed = bytearray(ring.seal(b"data", b"spool"))
    with pytest.raises(DecryptionError, match="altered"):
        ring.open(bytes(sealed), b"outputs")
    sealed[-1] ^= 1
    with pytest.raises(DecryptionError, match="altered"):
        ring.open(bytes(sealed), b"spool")
    with pytest.raises(DecryptionError, match="not data sealed"):
        ring.open(b"plain text, not sealed")


def test_data_sealed_under_a_key_no_longer_in_the_file_names_the_key_id() -> None:
    sealed = KeyRing.generate().seal(b"data")
    with pytest.raises(DecryptionError, match=sealed[4:12].hex()):
        KeyRing.generate().open(sealed)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "no key in it"),
        ("not base64!\n", "line 1 is not base64"),
        (binascii.b2a_base64(b"short").decode(), "holds 5 bytes, not 32"),
    ],
)
def test_a_bad_key_file_is_refused_with_the_reason(
    tmp_path: Path, content: str, reason: str
) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=reason) as raised:
        KeyRing.from_file(path)
    assert content.strip() == "" or content.strip() not in str(raised.value)


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="key file not found"):
        KeyRing.from_file(tmp_path / "absent")
