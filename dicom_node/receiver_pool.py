"""The node's listening socket and its receiver processes
(``python -m dicom_node.receiver_process``).

Light on purpose (the standard library and the settings): ``dicom-node serve`` starts the
receivers before it imports the database and processing code, so the node accepts
associations while the rest of it is still starting.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import structlog

from dicom_node.config import Settings

log = structlog.get_logger(__name__)

READY = "ready"
"""The first message a receiver process sends down its pipe."""


class StopFlag:
    """Set from a signal handler; polled by the main loop (no locks in the handler: it may
    interrupt the main thread while that holds one)."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, _signum: int, _frame: object) -> None:
        self.requested = True


@dataclass(frozen=True)
class Listeners:
    """The node's listening sockets: the plain DICOM port and the TLS port (either may be
    off: ``port = 0``, or no TLS certificate)."""

    plain: socket.socket | None = None
    tls: socket.socket | None = None

    def sockets(self) -> list[socket.socket]:
        return [listener for listener in (self.plain, self.tls) if listener is not None]

    def close(self) -> None:
        for listener in self.sockets():
            listener.close()


def open_listeners(settings: Settings) -> Listeners:
    plain = open_listener(settings.host, settings.port) if settings.port else None
    try:
        tls = open_listener(settings.host, settings.tls_port) if settings.tls_listening else None
    except OSError:
        if plain is not None:
            plain.close()
        raise
    return Listeners(plain, tls)


def open_listener(host: str, port: int, retry_seconds: float = 10.0) -> socket.socket:
    """Bind the DICOM port; after a crash, a dying receiver may hold it for a moment."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            listener = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        listener.setblocking(False)
        return listener


@dataclass
class ReceiverProcess:
    """A receiver process and the read end of its record pipe."""

    name: str
    process: subprocess.Popen[bytes]
    records: Connection
    ready: threading.Event = field(default_factory=threading.Event)
    done: bool = False


class ReceiverPool:
    """``count`` receiver processes accepting on ``listener``; their records go to
    ``deliver`` (set it when the indexer is up: until then they are kept)."""

    def __init__(self, settings: Settings, listeners: Listeners, count: int) -> None:
        self.settings = settings
        self.listeners = listeners
        self.count = count
        self._children: list[ReceiverProcess] = []
        self._lock = threading.Lock()
        self._deliver: Callable[[Any], None] | None = None
        self._early: list[Any] = []
        self._drain: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        for index in range(self.count):
            self._children.append(self._start_process(f"receiver-{index + 1}"))
        self._drain = threading.Thread(target=self._drain_records, name="index-drain")
        self._drain.start()

    def deliver_to(self, deliver: Callable[[Any], None]) -> None:
        """From now on records go to ``deliver``; those that came before go first."""
        with self._lock:
            for record in self._early:
                deliver(record)
            self._early.clear()
            self._deliver = deliver

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(c.ready.wait(max(deadline - time.monotonic(), 0)) for c in self._children)

    def _start_process(self, name: str) -> ReceiverProcess:
        reader, writer = os.pipe()
        listeners = self.listeners
        arguments = ["--records-fd", str(writer), "--parent-pid", str(os.getpid())]
        if listeners.plain is not None:
            arguments += ["--listener-fd", str(listeners.plain.fileno())]
        if listeners.tls is not None:
            arguments += ["--tls-listener-fd", str(listeners.tls.fileno())]
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.receiver_process", *arguments],
            stdin=subprocess.PIPE,
            pass_fds=(*(listener.fileno() for listener in listeners.sockets()), writer),
        )
        os.close(writer)  # the child holds the only writer: its death ends the pipe
        assert process.stdin is not None
        process.stdin.write(self.settings.model_dump_json().encode())
        process.stdin.close()
        return ReceiverProcess(name, process, Connection(reader, writable=False))

    def _drain_records(self) -> None:
        """Receiver processes' records to ``deliver``, until each has said it is done
        (or died: its pipe ends) after the pool was told to stop."""
        while True:
            with self._lock:
                pipes = {c.records: c for c in self._children if not c.done}
            if not pipes:
                if self._stopping.is_set():
                    return
                time.sleep(0.1)
                continue
            for pipe in wait(list(pipes), timeout=0.5):
                child = pipes[pipe]  # type: ignore[index]
                try:
                    record = child.records.recv()
                except (EOFError, OSError, pickle.UnpicklingError):
                    record = None
                if record == READY:
                    child.ready.set()
                elif record is None:
                    child.done = True
                    child.records.close()
                else:
                    with self._lock:
                        if self._deliver is None:
                            self._early.append(record)
                            continue
                    self._deliver(record)

    def check(self) -> None:
        """Replace a receiver process that died (its acknowledged files are on disk)."""
        if self._stopping.is_set():
            return
        with self._lock:
            for position, child in enumerate(self._children):
                if child.process.poll() is not None:
                    log.error(
                        "receiver process died; starting another", exitcode=child.process.returncode
                    )
                    self._children[position] = self._start_process(child.name)

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM: each finishes its open associations (or aborts them after the grace)."""
        self._stopping.set()
        for child in self._children:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        for child in self._children:
            try:
                child.process.wait(grace_seconds + 10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if self._drain is not None:
            self._drain.join(5)


def start_receivers(settings: Settings) -> ReceiverPool | None:
    """Bind the ports and start the receiver processes, when the node has more than one
    (with one, the node runs it in its own process). A TLS certificate or key that cannot
    be used stops the start here, before anything listens (``ConfigError``)."""
    from dicom_node.security.tls import check_tls_files

    check_tls_files(settings)
    if settings.effective_receiver_processes < 2:
        return None
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    listeners = open_listeners(settings)
    pool = ReceiverPool(settings, listeners, settings.effective_receiver_processes)
    pool.start()
    return pool
