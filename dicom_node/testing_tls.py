"""Throw-away certificates for DICOM TLS tests and benchmarks, made with ``cryptography``:
a CA, a server certificate for the loopback address signed by it, a client certificate
signed by it, and a client certificate from another CA that nobody trusts. Nothing is
committed: each test makes its own under its temporary directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

_Key = rsa.RSAPrivateKey


@dataclass(frozen=True)
class CertificateFiles:
    """A PEM certificate and its unencrypted PEM private key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class ThrowawayPki:
    ca: Path
    """The trusted CA's certificate (PEM)."""
    server: CertificateFiles
    """For ``localhost`` and ``127.0.0.1``, signed by ``ca``."""
    client: CertificateFiles
    """Signed by ``ca``."""
    untrusted_client: CertificateFiles
    """Signed by a CA that is not ``ca``."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> _Key:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sign(
    subject: str,
    key: _Key,
    issuer: tuple[x509.Name, _Key] | None,
    *,
    is_ca: bool = False,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, stem: str, certificate: x509.Certificate, key: _Key
) -> CertificateFiles:
    files = CertificateFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    files.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    files.private_key.chmod(0o600)
    return files


def make_test_pki(directory: Path) -> ThrowawayPki:
    """Write the CAs, certificates and keys under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_ca_key = _new_key(), _new_key()
    ca = _sign("dicom-node test CA", ca_key, None, is_ca=True)
    other_ca = _sign("someone else's CA", other_ca_key, None, is_ca=True)
    ca_path = _write(directory, "ca", ca, ca_key).certificate
    server_key, client_key, stranger_key = _new_key(), _new_key(), _new_key()
    signed_by_ca = (ca.subject, ca_key)
    server = _sign("localhost", server_key, signed_by_ca, hosts=("localhost", "127.0.0.1"))
    client = _sign("dicom-node test client", client_key, signed_by_ca)
    stranger = _sign("untrusted client", stranger_key, (other_ca.subject, other_ca_key))
    return ThrowawayPki(
        ca=ca_path,
        server=_write(directory, "server", server, server_key),
        client=_write(directory, "client", client, client_key),
        untrusted_client=_write(directory, "untrusted-client", stranger, stranger_key),
    )


def dcmtk_tls_arguments(pki: ThrowawayPki, own: CertificateFiles | None = None) -> list[str]:
    """DCMTK options for TLS to a peer whose certificate chains to ``pki.ca``: with our
    certificate ``own`` (``+tls key cert``), or none (``+tla``, anonymous)."""
    identity = ["+tls", str(own.private_key), str(own.certificate)] if own else ["+tla"]
    return [*identity, "+cf", str(pki.ca)]
