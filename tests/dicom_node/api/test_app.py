"""Health checks, and the API served by a running node over HTTP and HTTPS."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from db.enums import TokenRole
from dicom_node.api.context import ApiContext
from dicom_node.api.testing import ApiHarness, api_harness, settings_for
from dicom_node.api.tokens import create_token
from dicom_node.node import Node
from dicom_node.security.audit import Actor
from dicom_node.testing import free_port
from dicom_node.testing_tls import make_test_pki


def test_healthz_needs_no_token(api: ApiHarness) -> None:
    response = api.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_checks_database_spool_and_executor(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with api_harness(settings) as api:
        ready = api.client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {
            "database": True,
            "spool": True,
            "executor": True,
            "disk_space": True,
        }
        api.context.executor_slots = lambda: 0
        settings.spool_dir.chmod(0o500)
        try:
            not_ready = api.client.get("/readyz")
        finally:
            settings.spool_dir.chmod(0o700)
        assert not_ready.status_code == 503
        checks = not_ready.json()["checks"]
        assert checks["executor"] is False
        assert checks["database"] is True
        import os

        if os.geteuid() != 0:  # root writes through a read-only mode
            assert checks["spool"] is False


def test_a_running_node_serves_the_api_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    node = Node(settings_for(tmp_path, http_port=port))
    node.start()
    try:
        assert node.sessions is not None
        with node.sessions.begin() as session:
            token = create_token(session, "ops", TokenRole.OPERATOR, Actor.os_user())
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200, ready.text
        document = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()
        assert document["info"]["title"] == "dicom-node"
        assert token
    finally:
        node.stop(grace_seconds=1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_https_with_the_node_tls_settings(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    port = free_port()
    settings = settings_for(
        tmp_path,
        http_port=port,
        tls_port=free_port(),
        tls_certificate=pki.server.certificate,
        tls_private_key=pki.server.private_key,
    )
    node = Node(settings)
    node.start()
    try:
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        response = httpx.get(f"https://localhost:{port}/healthz", verify=trusting)
        assert response.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://localhost:{port}/healthz")  # the CA is not the system's
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://localhost:{port}/healthz")  # plain HTTP is not answered
    finally:
        node.stop(grace_seconds=1)


def test_api_port_in_use_stops_the_node_start(tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        node = Node(settings_for(tmp_path, http_port=taken.getsockname()[1]))
        with pytest.raises(OSError, match="in use"):
            node.start()
        node.stop(grace_seconds=0)


def test_context_defaults_wake_nothing(tmp_path: Path) -> None:
    with api_harness(settings_for(tmp_path)) as api:
        assert isinstance(api.context, ApiContext)
        api.context.wake_dispatcher()
        api.context.wake_exporter()
