"""A receiver's acceptor: takes connections off the node's shared listening sockets (the
plain port and the TLS port) and serves each on a thread of its own
(``dicom_node.ae.association``). The TLS handshake happens on that thread too, never here,
so a client that connects and never finishes its handshake holds up no one.

Several receiver processes accept on one socket (pre-fork style, see ``dicom_node.node``).
A receiver that is busy with associations waits a little before it accepts, so new
associations go to the idle ones. Connections are bounded per receiver: at most
``max_associations`` established ones (more are refused with A-ASSOCIATE-RJ "local limit
exceeded"), and ``PENDING_PER_ASSOCIATION`` times as many that have not asked for an
association yet. Port scanners and half-open probes are not associations: when there are
too many of those, the oldest is dropped, so idle connections cannot lock a modality out.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from dicom_node.ae.association import AdmissionControl, Association
from dicom_node.ae.negotiation import Negotiator
from dicom_node.handlers.context import ReceiverContext

log = structlog.get_logger(__name__)

ACCEPT_BACKOFF_PER_ASSOCIATION = 0.003
"""Seconds a receiver waits per association it is serving before it accepts another."""
DEFAULT_MAX_PDU_LENGTH = 1 << 20
"""The P-DATA-TF length announced when ``max_pdu_size`` is 0: bounded, and large enough
that PDU handling costs nothing next to the data (DCMTK sends at most 128 KiB anyway)."""
_POLL_SECONDS = 0.25
PENDING_PER_ASSOCIATION = 8


@dataclass(frozen=True)
class Listener:
    """A listening socket, and the TLS context of its port (None: plain TCP)."""

    socket: socket.socket
    tls: ssl.SSLContext | None = None


class Acceptor:
    def __init__(self, context: ReceiverContext, listeners: Sequence[Listener]) -> None:
        settings = context.settings
        self.context = context
        self.listeners = {listener.socket: listener for listener in listeners}
        self.negotiator = Negotiator(
            settings.max_pdu_size or DEFAULT_MAX_PDU_LENGTH,
            settings.accept_unknown_sop_classes,
        )
        self.admission = AdmissionControl(settings.max_associations)
        self.max_pending = PENDING_PER_ASSOCIATION * settings.max_associations
        self._connections: dict[Association, None] = {}  # in the order they came
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._accept_loop, name="dicom-acceptor", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select(list(self.listeners), [], [], _POLL_SECONDS)
            except (OSError, ValueError):  # the listener was closed under us: stopping
                return
            if not readable:
                continue
            busy = len(self.admission.established())
            if busy:
                time.sleep(min(ACCEPT_BACKOFF_PER_ASSOCIATION * busy, 0.02))
            for ready in readable:
                try:
                    connection, address = ready.accept()
                except OSError:  # BlockingIOError: another receiver took it
                    continue
                self._serve(connection, address, self.listeners[ready].tls)

    def _serve(
        self,
        connection: socket.socket,
        address: tuple[str, int],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        connection.setblocking(True)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            pending = [a for a in self._connections if not (a.requested or a.dropped)]
            if len(pending) >= self.max_pending:
                log.warning("too many connections without an association: dropping the oldest")
                pending[0].drop()
            association = Association(
                connection, address, self.context, self.negotiator, self.admission, tls
            )
            self._connections[association] = None
        threading.Thread(
            target=self._run, args=(association,), name="dicom-association", daemon=True
        ).start()

    def _run(self, association: Association) -> None:
        try:
            association.serve()
        finally:
            with self._lock:
                self._connections.pop(association, None)

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let established associations finish, then abort what is left."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + grace_seconds
        while self.admission.established() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            remaining = list(self._connections)
        if self.admission.established():
            log.warning("aborting associations still open after the grace period")
        for association in remaining:  # port probes and half-negotiated ones are dropped too
            association.abort()
        deadline = time.monotonic() + 5.0
        while self._connections and time.monotonic() < deadline:
            time.sleep(0.01)
