"""Deterministic UIDs and provenance for the objects the node derives from a series.

Reprocessing the same input with the same processor, version and parameters gives the
same Series and SOP Instance UIDs, so a retried export is idempotent at the PACS. The UIDs
are derived by hashing (source series UID with a digest of its instances that went in,
processor name, version, parameters digest, output kind, index) under a configurable UID
root (default ``2.25``, the UUID-derived root that needs no registration). The parts are
hashed as canonical JSON, so no two different tuples of parts hash the same bytes
(joining them with ``""`` would make ``(1, 23)`` and ``(12, 3)`` one UID).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from dicom_node import __version__
from processors.errors import BadInputError

#: DICOM UIDs are at most 64 characters; a root must leave room for the hash digits.
MAX_UID_LENGTH = 64
MAX_ROOT_LENGTH = 40

MANUFACTURER = "dicom-node"


# ValueError too: config.py checks the uid_root setting with it in a pydantic validator.
class UIDRootError(BadInputError, ValueError):
    """The configured UID root is not usable."""


def check_root(root: str | None) -> str | None:
    """The root without a trailing dot, or ``None`` for the default ``2.25`` derivation."""
    if root is None or root in ("", "2.25", "2.25."):
        return None
    root = root.rstrip(".")
    parts = root.split(".")
    if (
        len(root) > MAX_ROOT_LENGTH
        or not all(p.isdigit() for p in parts)
        or any(len(p) > 1 and p.startswith("0") for p in parts)
    ):
        raise UIDRootError(
            f"UID root {root!r} must be dot-separated numbers without leading zeros, "
            f"at most {MAX_ROOT_LENGTH} characters"
        )
    return root


def canonical_params(params: Mapping[str, Any] | BaseModel | None) -> str:
    """The parameters as canonical JSON (sorted keys, no spaces)."""
    if params is None:
        data: Any = {}
    elif isinstance(params, BaseModel):
        data = params.model_dump(mode="json")
    else:
        data = dict(params)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


UIDPart = str | int


def parts_digest(parts: tuple[UIDPart, ...]) -> bytes:
    """SHA-256 of the parts as a JSON array: one byte string per tuple of parts."""
    encoded = json.dumps(list(parts), separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).digest()


def derive_uid(root: str | None, *parts: UIDPart) -> str:
    """A UID from the hash of ``parts`` under ``root`` (``2.25`` when ``None``)."""
    checked = check_root(root)
    digest = parts_digest(parts)
    if checked is None:
        # The 2.25 form: a 128-bit integer, like a name-based UUID.
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"
    # As many decimal digits of the digest as fit; a decimal number's prefix has no
    # leading zero, so the last component is valid.
    digits = str(int.from_bytes(digest, "big"))
    return f"{checked}.{digits[: MAX_UID_LENGTH - len(checked) - 1]}"


@dataclass(frozen=True)
class Provenance:
    """Who made an output and with what: processor, version, family and parameters.

    ``upstream`` names the pipeline steps that ran before this one (``name@version`` with
    their parameters), so a segmentation of a denoised image does not share UIDs with a
    segmentation of the original.
    """

    processor: str
    version: str
    family: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    upstream: tuple[str, ...] = ()
    uid_root: str | None = None

    def __post_init__(self) -> None:
        if not self.processor or not self.version:
            raise ValueError("provenance needs the processor name and version")
        check_root(self.uid_root)

    @property
    def params_json(self) -> str:
        return canonical_params(self.params)

    @property
    def params_digest(self) -> str:
        key = json.dumps([self.params_json, list(self.upstream)], separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def software_versions(self) -> str:
        return f"{self.processor} {self.version}"[:64]

    @property
    def device_version(self) -> str:
        return f"dicom-node {__version__}"

    def parameters_text(self) -> dict[str, str]:
        """Parameters as strings (for AlgorithmParameters), keys in sorted order."""
        data = json.loads(self.params_json)
        out: dict[str, str] = {}
        for key in sorted(data):
            value = data[key]
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    def summary(self) -> str:
        """``name version params`` in one line (for DerivationDescription and SR text)."""
        text = f"{self.processor} {self.version} params={self.params_json}"
        if self.upstream:
            text += f" after {' > '.join(self.upstream)}"
        return text

    def series_uid(self, source_series_uid: str, kind: str, index: int = 0) -> str:
        return derive_uid(
            self.uid_root,
            "series",
            source_series_uid,
            self.processor,
            self.version,
            self.params_digest,
            kind,
            index,
        )

    def instance_uid(
        self, source_series_uid: str, kind: str, index: int = 0, number: int = 0
    ) -> str:
        return derive_uid(
            self.uid_root,
            "instance",
            source_series_uid,
            self.processor,
            self.version,
            self.params_digest,
            kind,
            index,
            number,
        )
