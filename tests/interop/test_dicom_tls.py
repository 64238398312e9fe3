"""DICOM TLS with real peers: DCMTK (echoscu, storescu +tls), openssl s_client, and Orthanc
with DicomTlsEnabled as a TLS destination."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_support import wait_for_study
from orchestration_support import (
    orthanc_instances,
    wait_for_exports,
    wait_for_jobs,
    write_config,
)
from sqlalchemy import create_engine, select

from db.models import Association
from dicom_node.synthetic import SyntheticSeries, generate_series
from dicom_node.testing import (
    NodeProcess,
    echoscu,
    free_port,
    require_tool,
    running_orthanc,
    start_node,
    storescu,
)
from dicom_node.testing_tls import ThrowawayPki, dcmtk_tls_arguments, make_test_pki

pytestmark = pytest.mark.interop

ACSE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: ThrowawayPki, **more: str) -> dict[str, str]:
    return {
        "DICOM_NODE_TLS_PORT": str(free_port()),
        "DICOM_NODE_TLS_CERTIFICATE": str(pki.server.certificate),
        "DICOM_NODE_TLS_PRIVATE_KEY": str(pki.server.private_key),
        "DICOM_NODE_TLS_CA_CERTIFICATES": str(pki.ca),
        "DICOM_NODE_ACSE_TIMEOUT": str(ACSE_TIMEOUT),
        "DICOM_NODE_EXECUTOR": "inline",
        **more,
    }


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: ThrowawayPki) -> Iterator[NodeProcess]:
    """Two receiver processes: each gets both listening sockets from the node."""
    directory = tmp_path_factory.mktemp("tls-node")
    env = tls_env(pki, DICOM_NODE_RECEIVER_PROCESSES="2")
    node = start_node(directory / "data", env=env)
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.stop()


def tls_port(node: NodeProcess) -> int:
    return int(node.env["DICOM_NODE_TLS_PORT"])


def rejection_reasons(node: NodeProcess) -> list[str]:
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as connection:
            query = select(Association.reject_reason).where(~Association.accepted)
            return [reason or "" for reason in connection.scalars(query)]
    finally:
        engine.dispose()


def wait_for_rejection(node: NodeProcess, fragment: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(fragment in reason for reason in rejection_reasons(node)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no rejection with {fragment!r}: {rejection_reasons(node)}")


def test_echoscu_and_storescu_over_tls(
    tls_node: NodeProcess, pki: ThrowawayPki, ct_series_dir: tuple[SyntheticSeries, Path]
) -> None:
    with_certificate = dcmtk_tls_arguments(pki, pki.client)
    echoed = echoscu(tls_port(tls_node), called_ae="DICOMNODE", extra_args=with_certificate)
    assert echoed.returncode == 0, echoed.stderr
    series, directory = ct_series_dir
    files = sorted(directory.iterdir())
    stored = storescu(files, tls_port(tls_node), called_ae="DICOMNODE", extra_args=with_certificate)
    assert stored.returncode == 0, stored.stderr
    wait_for_study(tls_node, series.study_instance_uid, len(files))
    plain = echoscu(tls_node.port, called_ae="DICOMNODE")  # the plain port beside it
    assert plain.returncode == 0, plain.stderr


@pytest.mark.parametrize(
    ("client", "recorded"),
    [
        ("anonymous", "peer did not return a certificate"),
        ("untrusted", "certificate verify failed"),
    ],
)
def test_dcmtk_without_a_trusted_certificate_is_refused_and_recorded(
    tls_node: NodeProcess, pki: ThrowawayPki, client: str, recorded: str
) -> None:
    own = pki.untrusted_client if client == "untrusted" else None
    result = echoscu(
        tls_port(tls_node), called_ae="DICOMNODE", extra_args=dcmtk_tls_arguments(pki, own)
    )
    assert result.returncode != 0
    wait_for_rejection(tls_node, f"TLS handshake failed: {recorded}")


@pytest.mark.parametrize("version", ["-tls1_1", "-tls1"])
def test_openssl_s_client_with_tls_1_1_or_1_0_is_refused(
    tls_node: NodeProcess, pki: ThrowawayPki, version: str
) -> None:
    result = subprocess.run(
        [
            require_tool("openssl"),
            "s_client",
            version,
            "-cipher",
            "DEFAULT:@SECLEVEL=0",  # the client's own library would refuse first otherwise
            *("-connect", f"127.0.0.1:{tls_port(tls_node)}"),
            *("-CAfile", str(pki.ca)),
            *("-cert", str(pki.client.certificate), "-key", str(pki.client.private_key)),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "alert protocol version" in result.stdout + result.stderr
    wait_for_rejection(tls_node, "TLS handshake failed: unsupported protocol")


def test_a_silent_connection_does_not_block_a_dcmtk_sender(
    tls_node: NodeProcess, pki: ThrowawayPki, tmp_path: Path
) -> None:
    files = generate_series(num_slices=3, rows=64, columns=64, uid_seed="tls-silent").write(
        tmp_path
    )
    with socket.create_connection(("127.0.0.1", tls_port(tls_node))) as silent:
        started = time.monotonic()
        result = storescu(
            files,
            tls_port(tls_node),
            called_ae="DICOMNODE",
            extra_args=dcmtk_tls_arguments(pki, pki.client),
        )
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < ACSE_TIMEOUT
        silent.settimeout(ACSE_TIMEOUT * 3)
        assert silent.recv(1) == b""  # closed by the node at the handshake deadline


QUICK_RULE = """
[[rules]]
name = "ct-seg"
match = { Modality = "CT" }
pipeline = ["threshold_segment"]
destinations = ["pacs"]
"""


def test_tls_only_node_receives_and_exports_to_orthanc_over_dicom_tls(
    pki: ThrowawayPki, tmp_path: Path
) -> None:
    orthanc_tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server.certificate),
        "DicomTlsPrivateKey": str(pki.server.private_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    with running_orthanc(tmp_path / "orthanc", extra_config=orthanc_tls) as orthanc:
        # The lines before the rule continue write_config's [[destinations]] table "pacs".
        destination_tls = f"""
tls = true
tls_ca_certificates = "{pki.ca}"
tls_certificate = "{pki.client.certificate}"
tls_private_key = "{pki.client.private_key}"
"""
        config = write_config(
            tmp_path / "node.toml", orthanc, destination_tls + QUICK_RULE, study_quiet_seconds=1.0
        )
        # TLS only (port = 0), in and out, with two receiver processes.
        env = tls_env(pki, DICOM_NODE_PORT="0", DICOM_NODE_RECEIVER_PROCESSES="2")
        node = start_node(tmp_path / "data", config=config, env=env)
        try:
            files = generate_series(num_slices=8, rows=64, columns=64, uid_seed="tls-out").write(
                tmp_path / "ct"
            )
            assert '"port": null' in node.log()  # no plain port
            tls_arguments = dcmtk_tls_arguments(pki, pki.client)
            sent = storescu(files, tls_port(node), called_ae="DICOMNODE", extra_args=tls_arguments)
            assert sent.returncode == 0, sent.stderr
            [job] = wait_for_jobs(node, 1, ("succeeded", "failed"))
            assert job["state"] == "succeeded", job
            exports = wait_for_exports(node)
            assert {e["state"] for e in exports} == {"delivered"}, exports
            stored = orthanc_instances(orthanc)
            assert stored and {e["sop_instance_uid"] for e in exports} == set(stored)
        finally:
            node.stop()
        # Without TLS the same Orthanc port refuses the node's plain association.
        plain = echoscu(orthanc.dicom_port, called_ae=orthanc.ae_title)
        assert plain.returncode != 0
