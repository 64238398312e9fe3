"""DICOM TLS: the context builder, its settings, and the node's TLS port in-process
(Python TLS clients and the node's own SCU; DCMTK and Orthanc are in tests/interop)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Association, AuditAction, AuditEvent
from dicom_node.ae.wire import (
    PduReader,
    PduType,
    PeerGoneError,
    ProtocolError,
    iter_pdvs,
    p_data_pdu,
)
from dicom_node.config import ConfigError, Destination, Settings, load_settings
from dicom_node.node import Node
from dicom_node.scu import AssociationFailedError, echo, scan_files, send
from dicom_node.security.tls import (
    ClientTls,
    client_context,
    destination_tls,
    server_context,
)
from dicom_node.synthetic import generate_series
from dicom_node.testing import free_port, local_settings
from dicom_node.testing_tls import CertificateFiles, ThrowawayPki, make_test_pki

HANDSHAKE_SECONDS = 1.5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(root: Path, pki: ThrowawayPki, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "tls_port": free_port(),
        "tls_certificate": pki.server.certificate,
        "tls_private_key": pki.server.private_key,
        "tls_ca_certificates": pki.ca,
        "acse_timeout": HANDSHAKE_SECONDS,
    }
    values.update(overrides)
    return local_settings(root, **values)


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: ThrowawayPki) -> Iterator[Node]:
    node = Node(tls_settings(tmp_path_factory.mktemp("tls-node"), pki))
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_seconds=2)


def client(pki: ThrowawayPki, own: CertificateFiles | None = None) -> ssl.SSLContext:
    """A client trusting ``pki.ca``, presenting ``own`` (default: the trusted client's)."""
    own = own or pki.client
    return client_context(pki.ca, own.certificate, own.private_key)


def rejections(node: Node) -> list[str]:
    assert node.sessions is not None
    with node.sessions() as session:
        return [
            row.reject_reason or ""
            for row in session.scalars(select(Association).where(~Association.accepted))
        ]


def wait_for_rejection(node: Node, fragment: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [reason for reason in rejections(node) if fragment in reason]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no rejection with {fragment!r}: {rejections(node)}")


# ---------------------------------------------------------------- the profile


def test_contexts_allow_tls_1_2_and_1_3_and_only_forward_secret_aead_suites(
    pki: ThrowawayPki,
) -> None:
    for context in (
        server_context(pki.server.certificate, pki.server.private_key),
        client_context(pki.ca),
    ):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12
        for cipher in tls12:
            assert cipher["kea"] == "kx-ecdhe" and cipher["aead"], cipher["name"]


def test_client_certificates_are_required_when_a_ca_file_is_given(pki: ThrowawayPki) -> None:
    settings = load_settings(
        None,
        tls_certificate=pki.server.certificate,
        tls_private_key=pki.server.private_key,
        tls_ca_certificates=pki.ca,
    )
    assert settings.effective_tls_require_client_certificate
    context = server_context(pki.server.certificate, pki.server.private_key, pki.ca)
    assert context.verify_mode is ssl.CERT_OPTIONAL
    required = server_context(
        pki.server.certificate, pki.server.private_key, pki.ca, require_client_certificate=True
    )
    assert required.verify_mode is ssl.CERT_REQUIRED


# ---------------------------------------------------------------- bad files: one clear line


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda pki, tmp: {"tls_certificate": tmp / "nope.crt"}, "tls_certificate: no such file"),
        (lambda pki, tmp: {"tls_private_key": tmp}, "tls_private_key: cannot read"),
        (
            lambda pki, tmp: {"tls_private_key": pki.client.private_key},
            "is not the key of tls_certificate",
        ),
        (
            lambda pki, tmp: {"tls_certificate": pki.ca.parent / "garbage"},
            "tls_certificate .*garbage is not a PEM certificate",
        ),
        (
            lambda pki, tmp: {"tls_private_key": pki.ca.parent / "garbage"},
            "tls_private_key .*garbage is not a PEM private key",
        ),
        (lambda pki, tmp: {"tls_ca_certificates": pki.ca.parent / "garbage"}, "holds no PEM"),
    ],
)
def test_unusable_certificate_files_are_one_line_config_errors(
    pki: ThrowawayPki, tmp_path: Path, break_it: object, expected: str
) -> None:
    (pki.ca.parent / "garbage").write_text("not a certificate\n")
    files = {
        "tls_certificate": pki.server.certificate,
        "tls_private_key": pki.server.private_key,
        "tls_ca_certificates": pki.ca,
    }
    files.update(break_it(pki, tmp_path))  # type: ignore[operator]
    with pytest.raises(ConfigError, match=expected) as raised:
        server_context(
            files["tls_certificate"], files["tls_private_key"], files["tls_ca_certificates"]
        )
    assert "\n" not in str(raised.value)


def test_an_encrypted_private_key_is_a_config_error(pki: ThrowawayPki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server.private_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"tls_private_key .*encrypted\.key is encrypted"):
        server_context(pki.server.certificate, encrypted)


def test_serve_with_a_missing_certificate_exits_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        f'tls_certificate = "{tmp_path / "missing.crt"}"\n'
        f'tls_private_key = "{tmp_path / "missing.key"}"\nexecutor = "inline"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: tls_certificate: no such file")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"port": 0}, "port = 0 turns the plain port off"),
        ({"tls_certificate": "a.crt"}, "go together"),
        ({"tls_ca_certificates": "ca.crt"}, "need tls_certificate"),
        (
            {"tls_certificate": "a", "tls_private_key": "k"}
            | {"tls_require_client_certificate": True},
            "needs tls_ca_certificates",
        ),
        ({"tls_certificate": "a", "tls_private_key": "k", "port": 2762}, "both 2762"),
    ],
)
def test_inconsistent_tls_settings_are_refused(values: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(None, **values)


def test_destination_tls_settings(pki: ThrowawayPki) -> None:
    with pytest.raises(ValueError, match="tls_ca_certificates is given but tls is false"):
        Destination(name="pacs", host="h", port=1, ae_title="A", tls_ca_certificates=pki.ca)
    plain = Destination(name="pacs", host="h", port=1, ae_title="A")
    assert destination_tls(plain) is None
    secure = Destination(
        name="pacs",
        host="h",
        port=1,
        ae_title="A",
        tls=True,
        tls_ca_certificates=pki.ca,
        tls_certificate=pki.client.certificate,
        tls_private_key=pki.server.private_key,
    )
    tls = destination_tls(secure)
    assert tls is not None
    with pytest.raises(ConfigError, match=r"destination 'pacs': tls_private_key .* is not the key"):
        tls.context()


# ---------------------------------------------------------------- the node's TLS port


def test_echo_and_store_over_tls_and_the_plain_port_beside_it(
    tls_node: Node, pki: ThrowawayPki, tmp_path: Path
) -> None:
    settings = tls_node.settings
    assert echo("127.0.0.1", settings.tls_port, **_titles(), tls=client(pki)) == 0
    assert echo("127.0.0.1", settings.port, **_titles()) == 0
    series = generate_series(num_slices=3, rows=512, columns=512, uid_seed="tls-store")
    series.write(tmp_path)
    files, _ = scan_files([tmp_path])
    report = send(files, "127.0.0.1", settings.tls_port, **_titles(), tls=client(pki))
    assert (report.sent, report.failed) == (3, [])
    study = settings.spool_dir / series.study_instance_uid
    assert len(list(study.rglob("*.dcm"))) == 3


def _titles() -> dict[str, str]:
    return {"calling_ae": "TLS-SCU", "called_ae": "DICOMNODE"}


@pytest.mark.parametrize(
    ("presented", "reason"),
    [("none", "peer did not return a certificate"), ("untrusted", "certificate verify failed")],
)
def test_a_client_without_a_trusted_certificate_is_refused_and_recorded(
    tls_node: Node, pki: ThrowawayPki, presented: str, reason: str
) -> None:
    anonymous = presented == "none"
    context = client_context(pki.ca) if anonymous else client(pki, pki.untrusted_client)
    with pytest.raises(AssociationFailedError, match="TLS handshake failed"):
        echo("127.0.0.1", tls_node.settings.tls_port, **_titles(), tls=context)
    wait_for_rejection(tls_node, f"TLS handshake failed: {reason}")
    assert tls_node.sessions is not None
    with tls_node.sessions() as session:  # audited in the same transaction
        refused = session.scalars(
            select(AuditEvent.reason).where(AuditEvent.action == AuditAction.ASSOCIATION_REFUSED)
        ).all()
    assert f"TLS handshake failed: {reason}" in refused


def test_weak_suites_and_plain_dicom_on_the_tls_port_are_refused(
    tls_node: Node, pki: ThrowawayPki
) -> None:
    weak = client(pki)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-GCM-SHA256")  # RSA key exchange: no forward secrecy
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", tls_node.settings.tls_port), timeout=5) as raw,
        weak.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass
    wait_for_rejection(tls_node, "no shared cipher")
    with pytest.raises(AssociationFailedError):
        echo("127.0.0.1", tls_node.settings.tls_port, **_titles(), timeout=5)
    wait_for_rejection(tls_node, "wrong version number")


def test_a_silent_connection_blocks_no_one_and_is_closed_after_the_handshake_timeout(
    tls_node: Node, pki: ThrowawayPki
) -> None:
    port = tls_node.settings.tls_port
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(HANDSHAKE_SECONDS * 4)
        started = time.monotonic()
        assert echo("127.0.0.1", port, **_titles(), tls=client(pki)) == 0
        assert time.monotonic() - started < HANDSHAKE_SECONDS
        assert silent.recv(1) == b""  # the node closed it
        assert time.monotonic() - started < HANDSHAKE_SECONDS * 3


def test_a_dripping_handshake_is_cut_at_the_deadline_for_the_whole_handshake(
    tls_node: Node,
) -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(500)
    closed_after = None
    with socket.create_connection(("127.0.0.1", tls_node.settings.tls_port)) as dripping:
        started = time.monotonic()
        for byte in hello:  # one byte every 0.1 s: each read is quick, the whole is not
            try:
                dripping.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.1)
    assert closed_after is not None
    assert HANDSHAKE_SECONDS <= closed_after < HANDSHAKE_SECONDS * 3


def test_port_zero_leaves_only_the_tls_port(pki: ThrowawayPki, tmp_path: Path) -> None:
    node = Node(tls_settings(tmp_path, pki, port=0))
    node.start()
    try:
        assert echo("127.0.0.1", node.settings.tls_port, **_titles(), tls=client(pki)) == 0
        assert node._listeners is not None and node._listeners.plain is None
    finally:
        node.stop(grace_seconds=1)


def test_a_server_certificate_that_does_not_chain_to_the_destination_ca_is_refused(
    tls_node: Node, pki: ThrowawayPki
) -> None:
    stranger = ClientTls(pki.untrusted_client.certificate, pki.client.certificate)
    with pytest.raises(ConfigError, match="go together"):
        stranger.context()
    untrusting = ClientTls(
        ca_certificates=pki.untrusted_client.certificate,
        certificate=pki.client.certificate,
        private_key=pki.client.private_key,
    ).context()
    with pytest.raises(AssociationFailedError, match="TLS handshake failed"):
        echo("127.0.0.1", tls_node.settings.tls_port, **_titles(), tls=untrusting)


def test_shutdown_cuts_an_open_tls_association(pki: ThrowawayPki, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    node = Node(tls_settings(tmp_path, pki))
    node.start()
    ae = AE(ae_title="TLS-SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.tls_port, tls_args=(client(pki), "localhost"))
    assert assoc.is_established
    started = time.monotonic()
    node.stop(grace_seconds=0.2)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established


# ---------------------------------------------------------------- the wire reader over TLS


@pytest.fixture
def tls_pair(pki: ThrowawayPki) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A connected (node side, peer side) pair of TLS sockets."""
    import threading

    node_end, peer_end = socket.socketpair()
    accepting = server_context(pki.server.certificate, pki.server.private_key)
    wrapped: list[ssl.SSLSocket] = []
    handshake = threading.Thread(
        target=lambda: wrapped.append(accepting.wrap_socket(node_end, server_side=True))
    )
    handshake.start()
    peer = client_context(pki.ca).wrap_socket(peer_end, server_hostname="localhost")
    handshake.join()
    with wrapped[0] as node, peer:
        yield node, peer


def test_the_pdu_reader_reassembles_a_pdu_from_many_tls_records(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    import threading

    node, peer = tls_pair
    fragment = bytes(range(256)) * 4000  # ~1 MB in one PDV
    pdu = p_data_pdu(1, 0x02, fragment)

    data = pdu + p_data_pdu(3, 0x03, b"next")  # the next PDU starts inside a TLS record

    def send() -> None:
        for start in range(0, len(data), 997):  # one TLS record per write
            peer.sendall(data[start : start + 997])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        reader = PduReader(node, timeout=5, max_p_data_length=len(pdu))
        kind, body = reader.read()
        assert kind is PduType.P_DATA_TF
        [pdv] = iter_pdvs(body)
        assert bytes(pdv.data) == fragment
        kind, body = reader.read()
        assert [bytes(p.data) for p in iter_pdvs(body)] == [b"next"]
    finally:
        sender.join(10)


def test_over_tls_a_pdu_over_the_limit_is_refused_from_its_header(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    node, peer = tls_pair
    peer.sendall(bytes([0x04, 0]) + (1 << 30).to_bytes(4, "big"))  # announces 1 GiB
    with pytest.raises(ProtocolError, match="exceeds"):
        PduReader(node, timeout=5, max_p_data_length=1 << 20).read()


def test_over_tls_a_dripping_pdu_is_cut_at_its_deadline(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    import threading

    node, peer = tls_pair
    pdu = p_data_pdu(1, 0x03, bytes(100))
    stop = threading.Event()

    def drip() -> None:
        for byte in pdu:
            if stop.wait(0.05):
                return
            peer.sendall(bytes([byte]))

    dripper = threading.Thread(target=drip)
    dripper.start()
    started = time.monotonic()
    try:
        with pytest.raises(PeerGoneError, match="within the timeout"):
            PduReader(node, timeout=0.5, max_p_data_length=1 << 20).read()
        assert time.monotonic() - started < 1.5
    finally:
        stop.set()
        dripper.join()
