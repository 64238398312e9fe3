"""The running node: database, spool, study assembler, and one or more receiver processes.

Receiving is CPU-bound Python (PDU decoding, dataset headers), so one process cannot use
more than one core. The node opens the listening socket once and runs
``receiver_processes`` receivers that all accept on it (pre-fork style); a receiver that
is busy with associations waits a little before accepting, so new associations go to the
idle ones. SO_REUSEPORT was tried first: its hash put 3 or 4 of 4 concurrent senders on
one process about half the time. Each receiver has its own indexer thread; the first
process also runs the start-up reconcile, the assembler, and the processing side: the
dispatcher (``dicom_node.jobs.dispatcher``), its executor (Dask worker processes by default)
and the exporter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import multiprocessing
import multiprocessing.synchronize
import os
import signal
import socket
import threading
import time
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.ae.pynetdicom_internals import serve_shared_listener, unrestricted_storage_service
from dicom_node.ae.server import build_ae, event_handlers
from dicom_node.assembler import StudyAssembler
from dicom_node.config import Settings
from dicom_node.export import Exporter
from dicom_node.handlers.context import ReceiverContext
from dicom_node.index import Indexer, reconcile
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
    """One process's DICOM server and the indexer that records what it stored."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        listener: socket.socket,
        *,
        idle_callback: Any = None,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.indexer = Indexer(
            sessions,
            batch_size=settings.index_batch_size,
            flush_seconds=settings.index_flush_seconds,
            idle_callback=idle_callback,
            idle_interval=settings.assembler_interval_seconds,
        )
        self._ae: Any = None
        self._server: Any = None
        self._pynetdicom_switches = contextlib.ExitStack()

    def start(self) -> None:
        settings = self.settings
        self._pynetdicom_switches.enter_context(
            unrestricted_storage_service(settings.accept_unknown_sop_classes)
        )
        self.indexer.start()
        context = ReceiverContext(
            settings=settings,
            spool=Spool(settings.spool_dir, fsync=settings.fsync),
            indexer=self.indexer,
        )
        self._ae = build_ae(settings)
        self._server = serve_shared_listener(self._ae, self.listener, event_handlers(context))

    def _established(self) -> list[Any]:
        return [assoc for assoc in self._ae.active_associations if assoc.is_established]

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let open associations finish, then flush the index."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            deadline = time.monotonic() + grace_seconds
            while self._established() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._established():
                log.warning("aborting associations still open after the grace period")
            # Connections that never sent an A-ASSOCIATE-RQ (port probes) are just dropped.
            self._ae.shutdown()
            self._ae = None
        self._pynetdicom_switches.close()
        self.indexer.stop()


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


def _receiver_process(
    settings: Settings,
    listener: socket.socket,
    stop: multiprocessing.synchronize.Event,
    ready: multiprocessing.synchronize.Event,
    parent_pid: int,
) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the node died before the death signal was armed
        listener.close()
        return
    # A handler must not touch `stop`: it may interrupt stop.wait() holding the same lock.
    terminated = StopFlag()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, terminated.handler)
    configure_logging(settings.log_level, settings.log_format)
    engine = make_engine(settings.effective_database_url)
    receiver = Receiver(settings, make_sessionmaker(engine), listener)
    receiver.start()
    ready.set()
    while not terminated.requested and not stop.wait(0.5):
        if os.getppid() != parent_pid:
            break
    receiver.stop(settings.shutdown_grace_seconds)
    engine.dispose()


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.assembler: StudyAssembler | None = None
        self._receiver: Receiver | None = None
        self._listener: socket.socket | None = None
        self._children: list[multiprocessing.process.BaseProcess] = []
        self.exporter: Exporter | None = None
        self.executor: Executor | None = None
        self.dispatcher: Dispatcher | None = None
        self._stop_children = multiprocessing.get_context("spawn").Event()
        self._stopped = threading.Event()

    @property
    def indexer(self) -> Indexer | None:
        return self._receiver.indexer if self._receiver else None

    def start(self) -> None:
        settings = self.settings
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)
        reconcile(Spool(settings.spool_dir, fsync=settings.fsync), self.sessions)
        with self.sessions.begin() as session:
            sync_from_settings(session, settings)
        self.assembler = StudyAssembler(self.sessions, assembler_quiet_seconds(settings))
        # Bind first: the executor's cluster takes free ports too.
        self._listener = open_listener(settings.host, settings.port)
        self._start_processing()
        self.assembler.check()
        self._receiver = Receiver(
            settings, self.sessions, self._listener, idle_callback=self.assembler.check
        )
        self._receiver.start()
        started = [
            self._spawn_receiver(f"receiver-{index + 1}")
            for index in range(settings.effective_receiver_processes - 1)
        ]
        for child, ready in started:
            if not ready.wait(settings.acse_timeout + 60):
                log.error("receiver process did not start", name=child.name)
            self._children.append(child)
        log.info(
            "node listening",
            ae_title=settings.ae_title,
            host=settings.host,
            port=settings.port,
            receiver_processes=settings.effective_receiver_processes,
            data_dir=str(settings.data_dir),
        )

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
        spawn = multiprocessing.get_context("spawn")
        ready = spawn.Event()
        child = spawn.Process(
            target=_receiver_process,
            args=(self.settings, self._listener, self._stop_children, ready, os.getpid()),
            name=name,
        )
        child.start()
        return child, ready

    def check_children(self) -> None:
        """Replace a receiver process that died (its acknowledged files are on disk)."""
        for position, child in enumerate(self._children):
            if child.is_alive() or self._stop_children.is_set():
                continue
            log.error("receiver process died; starting another", exitcode=child.exitcode)
            self._children[position], _ = self._spawn_receiver(child.name)

    def stop(self, grace_seconds: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stop_children.set()
        if self._receiver is not None:
            self._receiver.stop(grace)
        for child in self._children:
            child.join(grace + 10)
            if child.is_alive():
                child.kill()
        if self._listener is not None:
            self._listener.close()
        self._stop_processing(grace)
        if self.engine is not None:
            self.engine.dispose()
        self._stopped.set()
        log.info("node stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
