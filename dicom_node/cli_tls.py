"""DICOM TLS options of the client commands (``dicom-node echo`` and ``send``): ``--tls``
with the CA file the peer's certificate must chain to and our own certificate and key."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import typer

from processors.errors import BadInputError

_FILE = {"exists": True, "dir_okay": False, "readable": True}

TlsOption = Annotated[bool, typer.Option("--tls", help="DICOM TLS (TLS 1.2+, BCP 195).")]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", help="PEM CA certificates for the peer (default: the system's).", **_FILE
    ),
]
TlsCertOption = Annotated[
    Path | None, typer.Option("--tls-cert", help="Our PEM certificate, if asked.", **_FILE)
]
TlsKeyOption = Annotated[
    Path | None, typer.Option("--tls-key", help="Our unencrypted PEM key.", **_FILE)
]


def tls_context(
    enabled: bool, ca: Path | None, certificate: Path | None, key: Path | None
) -> ssl.SSLContext | None:
    """The client context the options ask for; None without ``--tls``."""
    from dicom_node.security.tls import client_context

    if not enabled:
        if ca or certificate or key:
            raise BadInputError("--tls-ca, --tls-cert and --tls-key need --tls")
        return None
    if (certificate is None) != (key is None):
        raise BadInputError("--tls-cert and --tls-key go together")
    return client_context(ca, certificate, key)
