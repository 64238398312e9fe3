"""DICOM TLS (PS3.15 Annex B, the BCP 195 profile): one ``SSLContext`` builder for every
socket the node accepts or opens.

TLS 1.2 and 1.3 only; for TLS 1.2 only the BCP 195 suites with forward secrecy and an
AEAD cipher (ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites are all of that
kind). No compression, no renegotiation. A file that is missing, unreadable, not PEM, or
a key that does not belong to its certificate is a ``ConfigError`` naming the setting, at
start-up, before anything listens or connects.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import ConfigError, Destination, Settings

BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
"""The TLS 1.2 suites (OpenSSL cipher string); TLS 1.3 suites are fixed by OpenSSL."""

_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


def _profile(*, server: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= _OPTIONS
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    return context


def _readable(path: Path, setting: str) -> None:
    try:
        with path.open("rb") as file:
            file.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{setting}: no such file: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _load_own_certificate(
    context: ssl.SSLContext, certificate: Path, private_key: Path, prefix: str
) -> None:
    _readable(certificate, f"{prefix}tls_certificate")
    _readable(private_key, f"{prefix}tls_private_key")

    def encrypted() -> str:  # OpenSSL asks for a password only for an encrypted key
        raise ConfigError(
            f"{prefix}tls_private_key {private_key} is encrypted: give it unencrypted"
        )

    try:
        context.load_cert_chain(certificate, private_key, password=encrypted)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                f"{prefix}tls_private_key {private_key} is not the key of"
                f" {prefix}tls_certificate {certificate}"
            ) from None
        if b"-----BEGIN CERTIFICATE-----" not in certificate.read_bytes():
            raise ConfigError(
                f"{prefix}tls_certificate {certificate} is not a PEM certificate"
            ) from None
        raise ConfigError(
            f"{prefix}tls_private_key {private_key} is not a PEM private key ({exc.reason or exc})"
        ) from None


def _load_trusted(context: ssl.SSLContext, ca_certificates: Path, setting: str) -> None:
    _readable(ca_certificates, setting)
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{setting}: {ca_certificates} holds no PEM certificate ({exc.reason or exc})"
        ) from None


def server_context(
    certificate: Path,
    private_key: Path,
    ca_certificates: Path | None = None,
    *,
    require_client_certificate: bool = False,
) -> ssl.SSLContext:
    """The listening side: our certificate and key; peers' certificates are checked
    against ``ca_certificates`` when given (and required when asked)."""
    if require_client_certificate and ca_certificates is None:
        raise ConfigError(
            "tls_require_client_certificate needs tls_ca_certificates to check them against"
        )
    context = _profile(server=True)
    _load_own_certificate(context, certificate, private_key, "")
    if ca_certificates is not None:
        _load_trusted(context, ca_certificates, "tls_ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(
    ca_certificates: Path | None = None,
    certificate: Path | None = None,
    private_key: Path | None = None,
    *,
    check_hostname: bool = True,
    prefix: str = "",
) -> ssl.SSLContext:
    """The connecting side: the peer's certificate must chain to ``ca_certificates`` (the
    system's trusted roots when None); our own certificate is presented when given."""
    if (certificate is None) != (private_key is None):
        raise ConfigError(f"{prefix}tls_certificate and {prefix}tls_private_key go together")
    context = _profile(server=False)
    context.check_hostname = check_hostname
    if ca_certificates is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_trusted(context, ca_certificates, f"{prefix}tls_ca_certificates")
    if certificate is not None and private_key is not None:
        _load_own_certificate(context, certificate, private_key, prefix)
    return context


def node_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of the node's TLS port, or None when TLS listening is off."""
    if not settings.tls_listening:
        return None
    assert settings.tls_certificate is not None and settings.tls_private_key is not None
    return server_context(
        settings.tls_certificate,
        settings.tls_private_key,
        settings.tls_ca_certificates,
        require_client_certificate=settings.effective_tls_require_client_certificate,
    )


@dataclass(frozen=True)
class ClientTls:
    """How to connect with TLS to one peer (a destination): the files, read when a
    context is made, and ``label`` to name the peer in errors."""

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = True
    label: str = ""

    def context(self) -> ssl.SSLContext:
        return client_context(
            self.ca_certificates,
            self.certificate,
            self.private_key,
            check_hostname=self.check_hostname,
            prefix=f"{self.label}: " if self.label else "",
        )


def destination_tls(destination: Destination) -> ClientTls | None:
    """How to connect to ``destination`` with TLS, or None when it is plain TCP."""
    if not destination.tls:
        return None
    return ClientTls(
        destination.tls_ca_certificates,
        destination.tls_certificate,
        destination.tls_private_key,
        destination.tls_check_hostname,
        f"destination {destination.name!r}",
    )


def check_tls_files(settings: Settings) -> None:
    """Build every context the settings describe once, so a bad file stops the start-up."""
    node_server_context(settings)
    for destination in settings.destinations:
        tls = destination_tls(destination)
        if tls is not None:
            tls.context()
