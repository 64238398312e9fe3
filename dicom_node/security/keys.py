"""The node's master keys: read from a key file, used to seal small secrets and data keys.

A key file holds one or more keys, one per line, each 32 random bytes in base64 as
``openssl rand -base64 32`` writes them. The first line is the current key: everything new
is sealed with it. The lines after it are older keys, kept so that what was sealed under
them stays readable: to rotate, put a new key on the first line and keep the old ones.

A sealed blob names the key that sealed it (the first 8 bytes of the key's SHA-256), so
the right key is found without trying each one.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from processors.errors import BadInputError

KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
SEALED_MAGIC = b"DNS1"


class KeyFileError(BadInputError):
    """The key file cannot be used; the message says why (never the key)."""


class DecryptionError(BadInputError):
    """Sealed data could not be opened: an unknown key, or the data was altered."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True)
class KeyRing:
    """The current key (``keys[0]``) and the older ones, by key id."""

    keys: tuple[bytes, ...] = field(repr=False)  # a logged ring must not show its keys

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyFileError("a key ring needs at least one key")
        for key in self.keys:
            if len(key) != KEY_BYTES:
                raise KeyFileError(f"a key is {KEY_BYTES} bytes, not {len(key)}")

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError as exc:
            raise KeyFileError(f"key file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read the key file {path}: not ASCII text") from exc
        keys: list[bytes] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = binascii.a2b_base64(line, strict_mode=True)
            except binascii.Error as exc:
                raise KeyFileError(f"{path}: line {number} is not base64") from exc
            if len(key) != KEY_BYTES:
                raise KeyFileError(
                    f"{path}: line {number} holds {len(key)} bytes, not {KEY_BYTES}"
                    " (make one with: openssl rand -base64 32)"
                )
            keys.append(key)
        if not keys:
            raise KeyFileError(f"{path}: no key in it (make one with: openssl rand -base64 32)")
        return cls(tuple(keys))

    @classmethod
    def generate(cls) -> KeyRing:
        return cls((secrets.token_bytes(KEY_BYTES),))

    @property
    def current_id(self) -> bytes:
        return key_id(self.keys[0])

    def key_for(self, wanted_id: bytes) -> bytes:
        for key in self.keys:
            if key_id(key) == wanted_id:
                return key
        raise DecryptionError(f"sealed under key {wanted_id.hex()}, which the key file lacks")

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """AES-256-GCM under the current key: magic, key id, nonce, ciphertext and tag."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.keys[0]).encrypt(nonce, plaintext, associated_data)
        return SEALED_MAGIC + self.current_id + nonce + sealed

    def open(self, blob: bytes, associated_data: bytes = b"") -> bytes:
        header = len(SEALED_MAGIC) + KEY_ID_BYTES + NONCE_BYTES
        if len(blob) < header + 16 or not blob.startswith(SEALED_MAGIC):
            raise DecryptionError("not data sealed by this node")
        wanted = blob[len(SEALED_MAGIC) : len(SEALED_MAGIC) + KEY_ID_BYTES]
        nonce = blob[len(SEALED_MAGIC) + KEY_ID_BYTES : header]
        try:
            return AESGCM(self.key_for(wanted)).decrypt(nonce, blob[header:], associated_data)
        except InvalidTag as exc:
            raise DecryptionError("sealed data was altered or sealed for another use") from exc


def write_key_file(path: Path, keys: Sequence[bytes]) -> None:
    """Write ``keys`` (current first) to a new file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as stream:
        for key in keys:
            stream.write(binascii.b2a_base64(key).decode("ascii"))
