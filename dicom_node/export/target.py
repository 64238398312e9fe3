"""Where exports go: a destination by name, as the configuration describes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dicom_node.config import Destination
from dicom_node.security.deid import DeidProfile
from dicom_node.security.tls import ClientTls, destination_tls

TransportKind = Literal["c-store", "stow-rs"]


@dataclass(frozen=True)
class ExportTarget:
    """Where to send: a destination by name, as the configuration describes it."""

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "DICOMNODE"
    max_attempts: int = 10
    timeout: float = 60.0
    url: str | None = None
    associations: int = 4
    tls: ClientTls | None = None
    """C-STORE over DICOM TLS, with these certificates; None: plain TCP."""
    # De-identified on the way out (issue 16 part 2): the profile, or None to send as is.
    deidentify: DeidProfile | None = None
    # Storage commitment (``dicom_node.export.commitment``): ask the PACS to commit what
    # was delivered; re-ask after ``commitment_timeout`` seconds, at most this many times.
    storage_commitment: bool = False
    commitment_timeout: float = 300.0
    commitment_requests: int = 3

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an export destination needs a name")
        if self.url is None and not 0 < self.port < 65536:
            raise ValueError(f"destination {self.name!r}: port {self.port} out of range")
        if self.max_attempts < 1:
            raise ValueError(f"destination {self.name!r}: max_attempts must be at least 1")
        if self.timeout <= 0:
            raise ValueError(f"destination {self.name!r}: timeout must be positive")
        if self.storage_commitment and self.url is not None:
            raise ValueError(f"destination {self.name!r}: storage commitment needs C-STORE")
        if self.associations < 1:
            raise ValueError(f"destination {self.name!r}: associations must be at least 1")

    @property
    def kind(self) -> TransportKind:
        """How to send: DICOMweb STOW-RS to a ``url``, else DIMSE C-STORE to host and port."""
        return "stow-rs" if self.url is not None else "c-store"


def export_target(destination: Destination, node_ae_title: str) -> ExportTarget:
    """The target for a configured destination; the node's AE title calls it by default."""
    return ExportTarget(
        name=destination.name,
        host=destination.host or (destination.url or ""),
        port=destination.port,
        ae_title=destination.ae_title,
        calling_ae_title=destination.calling_ae_title or node_ae_title,
        max_attempts=destination.max_attempts,
        timeout=destination.timeout,
        url=destination.url,
        associations=destination.associations,
        tls=destination_tls(destination),
        deidentify=(
            DeidProfile(frozenset(destination.deidentify_options), destination.allow_burned_in)
            if destination.deidentify
            else None
        ),
        storage_commitment=destination.storage_commitment,
        commitment_timeout=destination.commitment_timeout,
        commitment_requests=destination.commitment_requests,
    )
