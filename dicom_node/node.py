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
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.assembler import StudyAssembler
from dicom_node.config import Settings
from dicom_node.export import Exporter
from dicom_node.index import Indexer, reconcile
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import Executor, make_executor
from dicom_node.receiver import READY, Receiver
from dicom_node.records import IndexRecord
from dicom_node.routing import assembler_quiet_seconds
from dicom_node.routing_store import sync_from_settings
from dicom_node.storage import Spool

log = structlog.get_logger(__name__)


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
    """A receiver process (``dicom_node.receiver``) and the read end of its record pipe."""

    name: str
    process: subprocess.Popen[bytes]
    records: Connection
    ready: threading.Event = field(default_factory=threading.Event)
    done: bool = False


class Node:
    """The node: receivers, the indexer, the assembler and the processing side.

    With one receiver it runs in this process. With several, each is a process of its
    own that only receives: its records come to this process's indexer through a pipe,
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
        self._children: list[ReceiverProcess] = []
        self._children_lock = threading.Lock()
        self._early_records: list[IndexRecord] = []
        self._drain: threading.Thread | None = None
        self._stopping = threading.Event()
        self.exporter: Exporter | None = None
        self.executor: Executor | None = None
        self.dispatcher: Dispatcher | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        settings = self.settings
        started_at = time.time()
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self._listener = open_listener(settings.host, settings.port)
        if settings.effective_receiver_processes > 1:
            # Receiving starts now; the database catches up with what they store.
            for index in range(settings.effective_receiver_processes):
                self._children.append(self._start_receiver_process(f"receiver-{index + 1}"))
            self._drain = threading.Thread(target=self._drain_records, name="index-drain")
            self._drain.start()
        upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)
        spool = Spool(settings.spool_dir, fsync=settings.fsync)
        reconcile(spool, self.sessions, started_at=started_at)
        with self.sessions.begin() as session:
            sync_from_settings(session, settings)
        self.assembler = StudyAssembler(self.sessions, assembler_quiet_seconds(settings))
        indexer = Indexer(
            self.sessions,
            batch_size=settings.index_batch_size,
            flush_seconds=settings.index_flush_seconds,
            idle_callback=self._check_studies,
            idle_interval=settings.assembler_interval_seconds,
        )
        indexer.start()
        with self._children_lock:
            self.indexer = indexer
            for record in self._early_records:
                indexer.put(record)
            self._early_records.clear()
        if not self._children:
            self._receiver = Receiver(settings, self._listener, indexer.put)
            self._receiver.start()
        for child in self._children:
            if not child.ready.wait(60):
                log.error("receiver process did not start", name=child.name)
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

    def _deliver(self, record: IndexRecord) -> None:
        with self._children_lock:
            if self.indexer is None:  # the database is still being migrated or reconciled
                self._early_records.append(record)
                return
        self.indexer.put(record)

    def _drain_records(self) -> None:
        """Receiver processes' records into the indexer, until each has said it is done
        (or died: its pipe ends) after the node was told to stop."""
        while True:
            with self._children_lock:
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
                    self._deliver(record)

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

    def _start_receiver_process(self, name: str) -> ReceiverProcess:
        assert self._listener is not None
        reader, writer = os.pipe()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicom_node.receiver",
                "--listener-fd",
                str(self._listener.fileno()),
                "--records-fd",
                str(writer),
                "--parent-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            pass_fds=(self._listener.fileno(), writer),
        )
        os.close(writer)  # the child holds the only writer: its death ends the pipe
        assert process.stdin is not None
        process.stdin.write(self.settings.model_dump_json().encode())
        process.stdin.close()
        return ReceiverProcess(name, process, Connection(reader, writable=False))

    def check_children(self) -> None:
        """Replace a receiver process that died (its acknowledged files are on disk)."""
        if self._stopping.is_set():
            return
        with self._children_lock:
            for position, child in enumerate(self._children):
                if child.process.poll() is not None:
                    log.error(
                        "receiver process died; starting another", exitcode=child.process.returncode
                    )
                    self._children[position] = self._start_receiver_process(child.name)

    def stop(self, grace_seconds: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._stopping.set()
        if self._receiver is not None:
            self._receiver.stop(grace)
        for child in self._children:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        for child in self._children:
            try:
                child.process.wait(grace + 10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
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
