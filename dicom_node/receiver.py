"""A receiver: the acceptor on the node's listening socket, and where its records go.

With several receivers, each runs as ``python -m dicom_node.receiver_process``, started by the
node with the listening sockets (plain and TLS) and the write end of a pipe as inherited
descriptors and its settings as JSON on stdin; it loads its TLS certificate itself. A
receiver process imports no database code and starts nothing but the acceptor: it is
accepting about a second after it starts. It tells the node it is ready, then sends a
record down the pipe for every association and stored instance, and ``None`` when it
has stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import structlog

from dicom_node.ae.acceptor import Acceptor, Listener
from dicom_node.config import Settings
from dicom_node.disk_space import ReceiveWatermark
from dicom_node.handlers.context import ReceiverContext
from dicom_node.logging import configure_logging
from dicom_node.receiver_pool import READY, Listeners, StopFlag
from dicom_node.receiver_process import tie_to_parent
from dicom_node.records import IndexRecord
from dicom_node.security.tls import node_server_context
from dicom_node.storage import Spool

log = structlog.get_logger(__name__)


class Receiver:
    """One process's acceptor; ``index`` takes the records of what it stored."""

    def __init__(
        self, settings: Settings, listeners: Listeners, index: Callable[[IndexRecord], None]
    ) -> None:
        self.settings = settings
        self.listeners = listeners
        self.index = index
        self._acceptor: Acceptor | None = None

    def start(self) -> None:
        settings = self.settings
        context = ReceiverContext(
            settings=settings,
            spool=Spool.for_settings(settings),
            index=self.index,
            watermark=ReceiveWatermark.for_settings(settings),
        )
        listeners = []
        if self.listeners.plain is not None:
            listeners.append(Listener(self.listeners.plain))
        if self.listeners.tls is not None:
            listeners.append(Listener(self.listeners.tls, node_server_context(settings)))
        self._acceptor = Acceptor(context, listeners)
        self._acceptor.start()

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting and let open associations finish (or abort them after the grace)."""
        if self._acceptor is not None:
            self._acceptor.stop(grace_seconds)
            self._acceptor = None


def serve(settings: Settings, listeners: Listeners, records: Connection, parent: int) -> None:
    stop = StopFlag()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop.handler)
    sending = threading.Lock()

    def send(record: IndexRecord | str | None) -> None:
        with sending:
            records.send(record)

    receiver = Receiver(settings, listeners, send)
    receiver.start()
    send(READY)
    while not stop.requested and os.getppid() == parent:
        time.sleep(0.2)
    receiver.stop(settings.shutdown_grace_seconds)
    send(None)  # this receiver is done
    records.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listener-fd", type=int)
    parser.add_argument("--tls-listener-fd", type=int)
    parser.add_argument("--records-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    if not tie_to_parent(args.parent_pid):  # the node died before the death signal was armed
        return
    settings = Settings.model_validate_json(sys.stdin.read())
    configure_logging(settings.log_level, settings.log_format)
    listeners = Listeners(_inherited(args.listener_fd), _inherited(args.tls_listener_fd))
    serve(settings, listeners, Connection(args.records_fd, readable=False), args.parent_pid)


def _inherited(fd: int | None) -> socket.socket | None:
    if fd is None:
        return None
    listener = socket.socket(fileno=fd)
    listener.setblocking(False)
    return listener


if __name__ == "__main__":
    main()
