"""The HTTP(S) server of ``dicom-node serve``: uvicorn on a thread of the node's process.

The socket is bound by ``start`` in the caller's thread, so a port in use stops ``serve``
with one line like the DICOM port does. With the node's TLS settings
(``tls_certificate``/``tls_private_key``) it serves HTTPS with the same BCP 195 profile as
DICOM TLS; a client certificate is asked for (when ``tls_ca_certificates`` is set) but not
required, since browsers do not send one: the bearer token authenticates.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

import structlog
import uvicorn
from fastapi import FastAPI

from dicom_node.config import Settings
from dicom_node.security.tls import server_context

log = structlog.get_logger(__name__)

STOP_SECONDS = 5.0


def https_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    return server_context(
        settings.tls_certificate,
        settings.tls_private_key,
        settings.tls_ca_certificates,
        require_client_certificate=False,
    )


class ApiServer:
    """Serves ``app`` on ``host``:``port`` until ``stop``."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.tls = tls
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self.port = listener.getsockname()[1]
        self._socket = listener
        tls = self.tls

        def our_context(
            _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
        ) -> ssl.SSLContext:
            assert tls is not None
            return tls

        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,  # paths and queries may be logged by us at DEBUG, never here
            lifespan="off",
            ssl_context_factory=None if tls is None else our_context,
            timeout_keep_alive=15,
            limit_concurrency=256,
            h11_max_incomplete_event_size=64 * 1024,
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [listener]}, name="api-server", daemon=True
        )
        self._thread.start()
        log.info("api listening", url=self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_SECONDS)
        if self._socket is not None:
            self._socket.close()
