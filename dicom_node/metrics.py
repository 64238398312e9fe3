"""The node's Prometheus metrics: one registry per ``Node``, served at ``/metrics``.

Everything is counted in the node's main process, so prometheus-client's multiprocess mode
is not needed:

- receiving: the receiver processes send every record down a pipe to this process's
  indexer, and ``Indexer.put`` hands each to ``record_received``;
- jobs and processor timings: a job's result comes back to the dispatcher (from an inline
  run or a Dask worker) with its step timings: ``job_ended``;
- exports: the exporter thread reports each round's outcomes: ``exports_recorded``, which
  also observes the turnaround of each study whose last output was just delivered;
- queue depths are read from the database at scrape time (``DatabaseGauges``): they are the
  cluster's when several nodes share the database, where the counters are this node's.

``docs/admin.md`` ("Metrics and logs") lists every series.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy import Select, func, literal, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Job, JobState, Output, Study, StudyStatus, as_utc
from dicom_node.records import AssociationOpened, IndexRecord, InstanceStored

if TYPE_CHECKING:
    from dicom_node.export.queue import DeliveryReport

log = structlog.get_logger(__name__)

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TURNAROUND_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

RETRYING = "retrying"
"""The ``state`` of a job attempt that failed with attempts left (queued again)."""

ASSOCIATION_RESULTS = ("accepted", "rejected")
EXPORT_RESULTS = ("delivered", RETRYING, "failed")


class NodeMetrics:
    """The counters and histograms of one node, in a registry of its own (several nodes in
    one process, as in tests, do not collide). With ``sessions`` the registry also reads
    the queue depths from the database at each scrape; ``index_backlog`` says how many
    records wait for this node's indexer."""

    def __init__(
        self,
        sessions: sessionmaker[Session] | None = None,
        index_backlog: Callable[[], int] | None = None,
    ) -> None:
        self.sessions = sessions
        self._settled: dict[tuple[int, dt.datetime], None] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.instances_received = Counter(
            "dicom_node_instances_received",
            "Instances stored and acknowledged (C-STORE success) by this node's receivers",
            registry=registry,
        )
        self.bytes_received = Counter(
            "dicom_node_bytes_received",
            "Bytes of the instances stored by this node's receivers (their plaintext size)",
            registry=registry,
        )
        self.associations = Counter(
            "dicom_node_associations",
            "Associations requested of this node's receivers, by result (accepted, rejected)",
            ["result"],
            registry=registry,
        )
        self.jobs = Counter(
            "dicom_node_jobs",
            "Job attempts this node's dispatcher saw end, by rule and state "
            "(succeeded, failed, retrying: failed with attempts left)",
            ["rule", "state"],
            registry=registry,
        )
        self.job_duration = Histogram(
            "dicom_node_job_duration_seconds",
            "Seconds from a job attempt's start to its end, by rule",
            ["rule"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.processor_duration = Histogram(
            "dicom_node_processor_duration_seconds",
            "Seconds a processor ran in a pipeline step (not loading or encoding), by processor",
            ["processor"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.exports = Counter(
            "dicom_node_exports",
            "Export attempts this node made, by destination and result "
            "(delivered, retrying, failed: no attempts left)",
            ["destination", "result"],
            registry=registry,
        )
        self.study_turnaround = Histogram(
            "dicom_node_study_turnaround_seconds",
            "Seconds from a study's last instance received to its last output delivered, "
            "observed when nothing is left to do for it (no job queued or running, no "
            "export pending)",
            buckets=TURNAROUND_BUCKETS,
            registry=registry,
        )
        for result in ASSOCIATION_RESULTS:
            self.associations.labels(result)
        ProcessCollector(registry=registry)
        if sessions is not None:
            registry.register(DatabaseGauges(sessions, index_backlog))

    # -- hooks -----------------------------------------------------------------------------

    def record_received(self, record: IndexRecord) -> None:
        """A receiver's record, as it reaches the indexer."""
        if isinstance(record, InstanceStored):
            self.instances_received.inc()
            self.bytes_received.inc(record.size_bytes)
        elif isinstance(record, AssociationOpened):
            self.associations.labels("accepted" if record.accepted else "rejected").inc()

    def job_ended(self, job: Job, state: str, timings: Sequence[tuple[str, float]] = ()) -> None:
        """An attempt of ``job`` ended in ``state`` (committed); ``timings``: its (stage,
        seconds), where a processor's run is the stage ``<processor>:run``."""
        self.jobs.labels(job.rule_name, state).inc()
        if job.started_at is not None:
            seconds = (dt.datetime.now(dt.UTC) - as_utc(job.started_at)).total_seconds()
            self.job_duration.labels(job.rule_name).observe(max(seconds, 0.0))
        for stage, seconds in timings:
            processor, _, part = stage.rpartition(":")
            if part == "run" and processor:
                self.processor_duration.labels(processor).observe(seconds)
        self._observe_turnarounds(select(literal(job.study_id)))

    def exports_recorded(self, report: DeliveryReport) -> None:
        """What one export round recorded (committed)."""
        outcomes = (report.delivered, report.retrying, report.failed)
        for result, export_ids in zip(EXPORT_RESULTS, outcomes, strict=True):
            for export_id in export_ids:
                self.exports.labels(report.destinations[export_id], result).inc()
        if report.delivered:
            self._observe_turnarounds(
                select(Job.study_id)
                .join(Output, Output.job_id == Job.id)
                .join(Export, Export.output_id == Output.id)
                .where(Export.id.in_(sorted(report.delivered)))
            )

    def _observe_turnarounds(self, study_ids: Select[Any]) -> None:
        """A job ended or outputs were delivered: the studies among ``study_ids`` that
        are now settled get their turnaround (once each: see ``settled_turnarounds``)."""
        if self.sessions is None:
            return
        try:
            with self.sessions() as session:
                found = settled_turnarounds(session, study_ids)
        except Exception as exc:  # a metric must not fail the job or the export round
            log.warning("study turnaround not measured", error=type(exc).__name__)
            return
        for key, seconds in found.items():
            if key not in self._settled:
                self._settled[key] = None
                self.study_turnaround.observe(seconds)
        while len(self._settled) > SETTLED_REMEMBERED:
            del self._settled[next(iter(self._settled))]


SETTLED_REMEMBERED = 10_000
"""Settled studies a node remembers, so that a job's end and an export round that both
see a study settle observe it once."""


def settled_turnarounds(
    session: Session, study_ids: Select[Any]
) -> dict[tuple[int, dt.datetime], float]:
    """The studies among ``study_ids`` that are settled (no job queued or running, no
    export of their outputs pending or sending, at least one delivered): seconds from
    their last instance received to their last output delivered, by (study id, last
    received: a study received again settles again)."""
    study_exports = (
        select(Export.state, Export.delivered_at)
        .join(Output, Output.id == Export.output_id)
        .join(Job, Job.id == Output.job_id)
    )
    found: dict[tuple[int, dt.datetime], float] = {}
    for study_id, last_received_at in session.execute(
        select(Study.id, Study.last_received_at).where(Study.id.in_(study_ids))
    ):
        busy_jobs = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.study_id == study_id, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
        )
        exports = session.execute(study_exports.where(Job.study_id == study_id)).all()
        busy = busy_jobs or any(state in BUSY_EXPORTS for state, _ in exports)
        delivered = [as_utc(at) for state, at in exports if at is not None]
        if not busy and delivered:
            last_in = as_utc(last_received_at)
            found[(study_id, last_in)] = max((max(delivered) - last_in).total_seconds(), 0.0)
    return found


BUSY_EXPORTS = (ExportState.PENDING, ExportState.SENDING)


QUEUES = {
    "jobs": "jobs queued (due or waiting for a retry)",
    "jobs_running": "jobs running",
    "exports": "exports pending (due or waiting for a retry)",
    "exports_sending": "exports being sent",
    "studies_receiving": "studies not yet complete (waiting for the quiet time)",
    "index": "records waiting for this node's indexer (this node only)",
}


class DatabaseGauges:
    """``dicom_node_queue_depth{queue}``, read at scrape time: from the database (shared
    by every node using it), and the ``index`` backlog from this node's memory."""

    def __init__(
        self, sessions: sessionmaker[Session], index_backlog: Callable[[], int] | None = None
    ) -> None:
        self.sessions = sessions
        self.index_backlog = index_backlog

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        try:
            depths = self.depths()
        except Exception as exc:  # a scrape must answer while the database does not
            log.warning("queue depths not read", error=type(exc).__name__)
            depths = {}
        if self.index_backlog is not None:
            depths["index"] = self.index_backlog()
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "dicom_node_queue_depth",
            "Work waiting, by queue: " + "; ".join(f"{q}: {what}" for q, what in QUEUES.items()),
            labels=["queue"],
        )

    def depths(self) -> dict[str, int]:
        with self.sessions() as session:
            jobs = _count_by_state(session, Job.state, (JobState.QUEUED, JobState.RUNNING))
            exports = _count_by_state(session, Export.state, BUSY_EXPORTS)
            receiving = session.scalar(
                select(func.count()).select_from(Study).where(Study.status == StudyStatus.RECEIVING)
            )
        return {
            "jobs": jobs.get(JobState.QUEUED, 0),
            "jobs_running": jobs.get(JobState.RUNNING, 0),
            "exports": exports.get(ExportState.PENDING, 0),
            "exports_sending": exports.get(ExportState.SENDING, 0),
            "studies_receiving": receiving or 0,
        }


def _count_by_state(session: Session, column: Any, states: Sequence[object]) -> dict[object, int]:
    query = select(column, func.count()).where(column.in_(states)).group_by(column)
    return {state: count for state, count in session.execute(query)}
