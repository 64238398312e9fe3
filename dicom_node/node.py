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

import threading
import time
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.ae.commitment import PendingTransactions
from dicom_node.assembler import StudyAssembler
from dicom_node.config import Settings
from dicom_node.export import Exporter
from dicom_node.index import Indexer, reconcile
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import Executor, make_executor
from dicom_node.metrics import NodeMetrics
from dicom_node.nodes import Heartbeat
from dicom_node.receiver import Receiver
from dicom_node.receiver_pool import Listeners, ReceiverPool, open_listeners, start_receivers
from dicom_node.retention import RetentionThread
from dicom_node.routing import assembler_quiet_seconds
from dicom_node.routing_store import sync_from_settings
from dicom_node.storage import Spool

if TYPE_CHECKING:
    from dicom_node.api.server import ApiServer

log = structlog.get_logger(__name__)


class Node:
    """The node: receivers, the indexer, the assembler and the processing side.

    With one receiver it runs in this process. With several, each is a process of its
    own that only receives: its records come to this process's indexer through a pipe,
    so indexing never holds a receiver's GIL.
    """

    def __init__(self, settings: Settings, receivers: ReceiverPool | None = None) -> None:
        """``receivers``: a pool already started (by ``dicom-node serve``, as early as it
        can); otherwise the node starts its own when it has more than one receiver."""
        self.settings = settings
        self.engine: Engine | None = None
        self.sessions: sessionmaker[Session] | None = None
        self.assembler: StudyAssembler | None = None
        self.indexer: Indexer | None = None
        self._receiver: Receiver | None = None
        self._listeners: Listeners | None = None
        self.receivers = receivers
        self.exporter: Exporter | None = None
        self.executor: Executor | None = None
        self.dispatcher: Dispatcher | None = None
        self.spool: Spool | None = None
        self.api: ApiServer | None = None
        self.heartbeat: Heartbeat | None = None
        self.metrics: NodeMetrics | None = None
        self.retention: RetentionThread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        settings = self.settings
        started_at = time.time()
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.receivers is None:
            # Receiving starts now; the database catches up with what they store.
            self.receivers = start_receivers(settings)
            if self.receivers is None:  # one receiver, in this process, once indexing is up
                self._listeners = open_listeners(settings)
        upgrade(settings.effective_database_url)
        self.engine = make_engine(settings.effective_database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = spool = Spool.for_settings(settings)
        reconcile(spool, self.sessions, started_at=started_at)
        with self.sessions.begin() as session:
            sync_from_settings(session, settings)
        self.assembler = StudyAssembler(self.sessions, assembler_quiet_seconds(settings))
        self.metrics = NodeMetrics(
            self.sessions, lambda: self.indexer.backlog if self.indexer else 0
        )
        self.indexer = Indexer(
            self.sessions,
            batch_size=settings.index_batch_size,
            flush_seconds=settings.index_flush_seconds,
            idle_callback=self._check_studies,
            idle_interval=settings.assembler_interval_seconds,
            on_record=self.metrics.record_received,
        )
        self.indexer.start()
        if self._listeners is not None:
            self._receiver = Receiver(settings, self._listeners, self.indexer.put)
            self._receiver.start()
        if self.receivers is not None:
            self.receivers.deliver_to(self.indexer.put)
            if not self.receivers.wait_ready(60):
                log.error("a receiver process did not start")
        self._start_processing()
        self._start_heartbeat()
        self.retention = RetentionThread(self.sessions, settings)
        self.retention.start()
        self.assembler.check()
        if settings.http_port:
            self._start_api()
        log.info(
            "node listening",
            ae_title=settings.ae_title,
            host=settings.host,
            port=settings.port or None,
            tls_port=settings.tls_port if settings.tls_listening else None,
            receiver_processes=settings.effective_receiver_processes,
            data_dir=str(settings.data_dir),
        )

    def _start_api(self) -> None:
        from dicom_node.api.app import create_app
        from dicom_node.api.context import ApiContext
        from dicom_node.api.server import ApiServer, https_context

        assert self.sessions is not None and self.dispatcher is not None
        assert self.exporter is not None and self.executor is not None
        executor = self.executor
        context = ApiContext(
            self.settings,
            self.sessions,
            wake_dispatcher=self.dispatcher.wake,
            wake_exporter=self.exporter.wake,
            executor_slots=lambda: executor.slots,
            routing_changed=self.dispatcher.routing_changed,
            metrics=self.metrics,
        )
        settings = self.settings
        self.api = ApiServer(
            create_app(context), settings.http_host, settings.http_port, https_context(settings)
        )
        self.api.start()

    def _check_studies(self) -> None:
        if self.assembler is not None:
            self.assembler.check()

    def _start_heartbeat(self) -> None:
        """Beat in ``nodes``; take over the work of nodes silent past their lease."""
        assert self.sessions is not None
        dispatcher, exporter = self.dispatcher, self.exporter

        def wake() -> None:
            if dispatcher is not None:
                dispatcher.wake()
            if exporter is not None:
                exporter.wake()

        settings = self.settings
        self.heartbeat = Heartbeat(
            self.sessions,
            settings.effective_node_name,
            settings.node_heartbeat_seconds,
            settings.node_lease_seconds,
            on_taken=wake,
        )
        self.heartbeat.start()

    def _start_processing(self) -> None:
        """The exporter, the executor and the dispatcher, which the assembler wakes."""
        assert self.sessions is not None and self.assembler is not None and self.spool is not None
        metrics = self.metrics
        self.exporter = Exporter(
            self.sessions,
            (),
            node=self.settings.effective_node_name,
            keys=self.spool.keys,
            metrics=metrics,
            commitments=PendingTransactions.under(self.settings.data_dir),
        )
        self.executor = make_executor(self.settings)
        self.dispatcher = Dispatcher(
            self.settings, self.sessions, self.executor, self.exporter, metrics
        )
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

    def check_children(self) -> None:
        """Replace a receiver process that died (its acknowledged files are on disk)."""
        if self.receivers is not None:
            self.receivers.check()

    def stop(self, grace_seconds: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        if self.api is not None:
            self.api.stop()
        if self._receiver is not None:
            self._receiver.stop(grace)
        if self._listeners is not None:
            self._listeners.close()
        if self.receivers is not None:
            self.receivers.stop(grace)
            self.receivers.listeners.close()
        if self.indexer is not None:
            self.indexer.stop()
        self._stop_processing(grace)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.engine is not None:
            self.engine.dispose()
        self._stopped.set()
        log.info("node stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
