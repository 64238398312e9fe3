"""``dicom-node echo`` and ``send`` with ``--tls`` against the node's TLS port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.node import Node
from dicom_node.synthetic import generate_series
from dicom_node.testing import free_port, local_settings
from dicom_node.testing_tls import ThrowawayPki, make_test_pki
from tests.dicom_node.test_cli import assert_refused

runner = CliRunner()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory, pki: ThrowawayPki) -> Iterator[int]:
    settings = local_settings(
        tmp_path_factory.mktemp("node"),
        tls_port=free_port(),
        tls_certificate=pki.server.certificate,
        tls_private_key=pki.server.private_key,
        tls_ca_certificates=pki.ca,
    )
    node = Node(settings)
    node.start()
    try:
        yield settings.tls_port
    finally:
        node.stop(grace_seconds=1)


def tls_options(pki: ThrowawayPki, *, certificate: bool = True) -> list[str]:
    own = ["--tls-cert", str(pki.client.certificate), "--tls-key", str(pki.client.private_key)]
    return ["--tls", "--tls-ca", str(pki.ca), *(own if certificate else [])]


def test_echo_and_send_over_tls(tls_port: int, pki: ThrowawayPki, tmp_path: Path) -> None:
    echoed = runner.invoke(app, ["echo", "127.0.0.1", str(tls_port), *tls_options(pki)])
    assert echoed.exit_code == 0, echoed.output
    files = generate_series(num_slices=2, rows=64, columns=64, uid_seed="cli-tls").write(tmp_path)
    sent = runner.invoke(
        app, ["send", *map(str, files), "--to", f"127.0.0.1:{tls_port}", *tls_options(pki)]
    )
    assert sent.exit_code == 0, sent.output
    assert "sent 2 of 2" in sent.output


def test_echo_without_a_client_certificate_fails_with_the_reason(
    tls_port: int, pki: ThrowawayPki
) -> None:
    result = runner.invoke(
        app, ["echo", "127.0.0.1", str(tls_port), *tls_options(pki, certificate=False)]
    )
    assert_refused(result, 1, "TLS handshake failed")


def test_tls_files_without_tls_are_bad_input(pki: ThrowawayPki) -> None:
    result = runner.invoke(app, ["echo", "127.0.0.1", "104", "--tls-ca", str(pki.ca)])
    assert_refused(result, 2, "need --tls")
