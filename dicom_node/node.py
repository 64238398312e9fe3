"""The running node: database, spool, study assembler, and one or more receivers.

Receiving is CPU-bound Python (PDU handling, dataset headers), so one process cannot use
more than one core. The node opens the listening socket once; with
``receiver_processes`` above one, that many receiver processes accept on it (pre-fork
style). A receiver that is busy with associations waits a little before accepting, so
new associations go to the idle ones. SO_REUSEPORT was tried first: its hash put 3 or 4
of 4 concurrent senders on one process about half the time. Receiver processes only
receive: each sends the records of what it stored down a pipe to this process, whose
one indexer writes them to the database, next to the assembler and the processing side
(the dispatcher, ``dicom_node.jobs.dispatcher``, its executor and the exporter). With one
receiver, it runs in this process. See ``docs/operations.md`` for the threads and what
is fsync'd when.
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import multiprocessing.synchronize
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.ae.acceptor import Acceptor
from dicom_node.assembler import StudyAssembler
from dicom_node.config import Settings
from dicom_node.export import Exporter
from dicom_node.handlers.context import ReceiverContext
from dicom_node.index import Indexer, IndexRecord, reconcile
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import Executor, make_executor
from dicom_node.logging import configure_logging
from dicom_node.routing import assembler_quiet_seconds
from dicom_node.routing_store import sync_from_settings
from dicom_node.storage import Spool

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1


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


class Receiver:
    """One process's acceptor; ``index`` takes the records of what it stored."""

    def __init__(
        self, settings: Settings, listener: socket.socket, index: Callable[[IndexRecord], None]
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.index = index
        self._acceptor: Acceptor | None = None

    def start(self) -> None:
        settings = self.settings
        context = ReceiverContext(
            settings=settings,
            spool=Spool(settings.spool_dir, fsync=settings.fsync),
            index=self.index,
        )
        self._acceptor = Acceptor(context, self.listener)
        self._acceptor.start()

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting and let open associations finish (or abort them after the grace)."""
        if self._acceptor is not None:
            self._acceptor.stop(grace_seconds)
            self._acceptor = None


class StopFlag:
    """Set from a signal handler; polled by the main loop (no locks in the handler)."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, _signum: int, _frame: object) -> None:
        self.requested = True


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.warning("cannot tie the receiver's life to the node's on this platform")


@dataclass
class _ReceiverLink:
    """What the receiver processes share with the node: the socket and two events."""

    listener: socket.socket
    go: multiprocessing.synchronize.Event
    stop: multiprocessing.synchronize.Event
    parent_pid: int


def _receiver_process(
    settings: Settings, link: _ReceiverLink, records: Connection, ready: Any
) -> None:
    """A receiver process: no database, no processing. Its records go to the node's
    indexer through a pipe of its own (a receiver that dies takes only its pipe along)."""
    _die_with_parent()
    if os.getppid() != link.parent_pid:  # the node died before the death signal was armed
        link.listener.close()
        return
    # A handler must not touch `stop`: it may interrupt stop.wait() holding the same lock.
    terminated = StopFlag()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, terminated.handler)
    configure_logging(settings.log_level, settings.log_format)
    while not link.go.wait(0.1):  # the node reconciles the spool before anyone receives
        if terminated.requested or link.stop.is_set() or os.getppid() != link.parent_pid:
            return
    sending = threading.Lock()

    def send(record: IndexRecord | None) -> None:
        with sending:
            records.send(record)

    receiver = Receiver(settings, link.listener, send)
    receiver.start()
    ready.set()
    while not terminated.requested and not link.stop.wait(0.5):
        if os.getppid() != link.parent_pid:
            break
    receiver.stop(settings.shutdown_grace_seconds)
    send(None)  # this receiver is done
    records.close()


class Node:
    """The node: receivers, the indexer, the assembler and the processing side.

    With one receiver it runs in this process. With several, each is a process of its
    own that only receives: its records come to this process's indexer through a queue,
    so indexing never holds a receiver's GIL.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.assembler: StudyAssembler | None = None
        self.indexer: Indexer | None = None
        self._receiver: Receiver | None = None
        self._listener: socket.socket | None = None
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._link: _ReceiverLink | None = None
        self._drain: threading.Thread | None = None
        self._pipes: list[Connection] = []
        self._pipes_lock = threading.Lock()
        self.exporter: Exporter | None = None
        self.executor: Executor | None = None
        self.dispatcher: Dispatcher | None = None
        self._spawn = multiprocessing.get_context("spawn")
        self._stopped = threading.Event()

    def start(self) -> None:
        settings = self.settings
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self._listener = open_listener(settings.host, settings.port)
        if settings.effective_receiver_processes > 1:
            # Started first: they import while this process migrates and reconciles.
            self._link = _ReceiverLink(
                self._listener, self._spawn.Event(), self._spawn.Event(), os.getpid()
            )
            started = [
                self._spawn_receiver(f"receiver-{index + 1}")
                for index in range(settings.effective_receiver_processes)
            ]
        upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)
        reconcile(Spool(settings.spool_dir, fsync=settings.fsync), self.sessions)
        with self.sessions.begin() as session:
            sync_from_settings(session, settings)
        self.assembler = StudyAssembler(self.sessions, assembler_quiet_seconds(settings))
        self.indexer = Indexer(
            self.sessions,
            batch_size=settings.index_batch_size,
            flush_seconds=settings.index_flush_seconds,
            idle_callback=self._check_studies,
            idle_interval=settings.assembler_interval_seconds,
        )
        self.indexer.start()
        if self._link is None:
            self._receiver = Receiver(settings, self._listener, self.indexer.put)
            self._receiver.start()
        else:
            self._drain = threading.Thread(target=self._drain_records, name="index-drain")
            self._drain.start()
            self._link.go.set()
            for child, ready in started:
                if not ready.wait(settings.acse_timeout + 60):
                    log.error("receiver process did not start", name=child.name)
                self._children.append(child)
        self._start_processing()
        self.assembler.check()
        log.info(
            "node listening",
            ae_title=settings.ae_title,
            host=settings.host,
            port=settings.port,
            receiver_processes=settings.effective_receiver_processes,
            data_dir=str(settings.data_dir),
        )

    def _check_studies(self) -> None:
        if self.assembler is not None:
            self.assembler.check()

    def _drain_records(self) -> None:
        """Receiver processes' records into the indexer, until each has said it is done
        (or died: its pipe ends) after the node was told to stop."""
        assert self._link is not None and self.indexer is not None
        while True:
            with self._pipes_lock:
                pipes = list(self._pipes)
            if not pipes:
                if self._link.stop.is_set():
                    return
                time.sleep(0.1)
                continue
            for pipe in wait(pipes, timeout=0.5):
                assert isinstance(pipe, Connection)
                try:
                    record = pipe.recv()
                except (EOFError, OSError, pickle.UnpicklingError):
                    record = None
                if record is None:
                    with self._pipes_lock:
                        self._pipes.remove(pipe)
                    pipe.close()
                else:
                    self.indexer.put(record)

    def _start_processing(self) -> None:
        """The exporter, the executor and the dispatcher, which the assembler wakes."""
        assert self.sessions is not None and self.assembler is not None
        self.exporter = Exporter(self.sessions, (), node=self.settings.effective_node_name)
        self.executor = make_executor(self.settings)
        self.dispatcher = Dispatcher(self.settings, self.sessions, self.executor, self.exporter)
        self.dispatcher.start()
        self.exporter.start()
        dispatcher = self.dispatcher
        self.assembler.subscribe(lambda _event: dispatcher.wake())

    def _stop_processing(self, grace: float) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop(grace)
        if self.exporter is not None:
            self.exporter.stop(grace + 5)
        if self.executor is not None:
            try:
                self.executor.close()
            except Exception:  # the cluster may be half gone already; we are stopping
                log.exception("closing the executor failed")

    def _spawn_receiver(
        self, name: str
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
        assert self._link is not None
        ready = self._spawn.Event()
        reader, writer = self._spawn.Pipe(duplex=False)
        child = self._spawn.Process(
            target=_receiver_process, args=(self.settings, self._link, writer, ready), name=name
        )
        child.start()
        writer.close()  # the child holds the only writer: its death ends the pipe
        with self._pipes_lock:
            self._pipes.append(reader)
        return child, ready

    def check_children(self) -> None:
        """Replace a receiver process that died (its acknowledged files are on disk)."""
        if self._link is None or self._link.stop.is_set():
            return
        for position, child in enumerate(self._children):
            if not child.is_alive():
                log.error("receiver process died; starting another", exitcode=child.exitcode)
                self._children[position], _ = self._spawn_receiver(child.name)

    def stop(self, grace_seconds: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        if self._link is not None:
            self._link.stop.set()
        if self._receiver is not None:
            self._receiver.stop(grace)
        for child in self._children:
            child.join(grace + 10)
            if child.is_alive():
                child.kill()
        if self._drain is not None:
            self._drain.join(5)
        if self.indexer is not None:
            self.indexer.stop()
        if self._listener is not None:
            self._listener.close()
        self._stop_processing(grace)
        if self.engine is not None:
            self.engine.dispose()
        self._stopped.set()
        log.info("node stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
