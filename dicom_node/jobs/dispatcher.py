"""The dispatcher: completed studies -> jobs -> executor -> outputs and exports.

One thread in the node's main process. Each round it

1. claims the ``complete`` study events nobody routed yet and makes their jobs
   (``dicom_node.jobs.state.create_jobs``, with the rules and destinations of the database);
2. collects the jobs that finished: their outputs become ``outputs`` rows and one export
   per destination (``dicom_node.export.queue.enqueue``), in the same transaction as the job's
   ``succeeded``; a failure is retried after a backoff while attempts are left;
3. stops jobs past ``job_timeout_seconds`` (the executor restarts their worker), and the
   runs of jobs that are no longer running here: cancelled by an operator (on any node
   sharing the database) or taken back with ``retry --force`` (``stop_cancelled``);
4. claims due queued jobs while the executor has free slots and submits them.

Outputs go out as soon as their step is written: a worker leaves one file per finished
step under the job's output folder (``dicom_node.jobs.worker.written_steps``), and the
dispatcher records and enqueues those outputs while later steps run. So the derived
series of a first step reaches the PACS while the segmentation still runs; a job that
fails later has sent the outputs of the steps that finished (each a complete object).

A job's state changes only through ``dicom_node.jobs.state.transition``. On start, jobs this
node left ``running`` are queued again; on stop, jobs still running are queued again
too, so nothing is lost between restarts. Output UIDs are deterministic, so running a
job twice on the same instances produces the same objects, and the PACS keeps one copy; a
study that completes again while its job runs has it run again after (``run_again``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Job, JobState, Output
from dicom_node.config import ConfigError, Settings
from dicom_node.export.queue import enqueue
from dicom_node.export.target import ExportTarget, export_target
from dicom_node.export.worker import Exporter
from dicom_node.jobs.executors import Executor, JobFuture
from dicom_node.jobs.state import (
    claim_next,
    consume_completed_studies,
    create_jobs,
    hold_running,
    requeue_interrupted,
    run_again,
    timings_document,
    transition,
    utcnow,
)
from dicom_node.jobs.worker import JobRefusedError, JobResult, JobSpec, written_steps
from dicom_node.metrics import RETRYING, NodeMetrics
from dicom_node.model_registry import model_refs
from dicom_node.outputs import upsert_outputs
from dicom_node.plugin_state import load_states
from dicom_node.process import OutputRecord
from dicom_node.routing_store import load_routing
from dicom_node.security.crypto import load_keys
from dicom_node.security.roundtrip import enqueue_sources, reidentify_returned_study
from processors.registry import discover

log = structlog.get_logger(__name__)

RETRY_BASE_SECONDS = 10.0
ROUTING_RELOAD_SECONDS = 2.0


@dataclass
class _Running:
    job_id: int
    future: JobFuture
    deadline: float
    output_dir: Path
    steps_seen: set[str] = field(default_factory=set)


def _series_paths(session: Session, series_id: int) -> tuple[str, ...]:
    rows = session.scalars(
        select(Instance.path)
        .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
        .order_by(Instance.instance_number.is_(None), Instance.instance_number, Instance.id)
    )
    return tuple(rows)


def job_output_dir(outputs_dir: Path, job_id: int, paths: Sequence[str]) -> Path:
    """Where a run of the job writes: one folder per set of input instances. A retry of the
    same input rewrites the same files (same UIDs); the run on a grown series writes new
    ones, so the first run's files, still waiting for export, are not overwritten."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]
    return outputs_dir / f"job-{job_id}" / digest


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        executor: Executor,
        exporter: Exporter | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self.sessions = sessions
        self.executor = executor
        self.exporter = exporter
        self.node = settings.effective_node_name
        self.keys = load_keys(settings.spool_encryption_key_file)
        self.routing = settings
        self._routing_loaded = 0.0
        self._routing_stale = False
        self._running: dict[int, _Running] = {}
        self._gpu_processors = {
            info.name for info in discover() if "cupy" in info.requires and info.available
        }
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        with self.sessions.begin() as session:
            requeue_interrupted(session, self.node)
        self.reload_routing(force=True)
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def routing_changed(self) -> None:
        """Reload the rules and destinations in a round that starts now."""
        self._routing_stale = True
        self._wake.set()

    def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop claiming; wait up to ``grace_seconds`` for running jobs, queue the rest again."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        deadline = time.monotonic() + grace_seconds
        while self._running and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.1)
        self.collect()
        for running in list(self._running.values()):
            self.executor.kill(running.future)
            with self.sessions.begin() as session:
                transition(
                    session,
                    running.job_id,
                    JobState.QUEUED,
                    expected=JobState.RUNNING,
                    not_before=utcnow(),
                    claimed_by=None,
                    error="interrupted: the node stopped while the job ran",
                )
        self._running.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a database hiccup must not end the dispatcher
                log.exception("dispatcher round failed")
            self._wake.wait(self.settings.dispatcher_interval_seconds)
            self._wake.clear()

    # -- one round -------------------------------------------------------------------------

    def run_once(self) -> None:
        self.reload_routing()
        self.route_completed_studies()
        self.stop_cancelled()
        self.collect()
        self.enforce_timeouts()
        if not self._stop.is_set():
            self.fill()

    def reload_routing(self, *, force: bool = False) -> None:
        recent = time.monotonic() - self._routing_loaded < ROUTING_RELOAD_SECONDS
        if recent and not force and not self._routing_stale:
            return
        self._routing_stale = False
        try:
            with self.sessions() as session:
                self.routing = load_routing(session, self.settings)
        except ConfigError as exc:
            log.error("keeping the previous routing", error=str(exc))
        self._routing_loaded = time.monotonic()
        if self.exporter is not None:
            self.exporter.set_targets(self.targets())

    def targets(self) -> list[ExportTarget]:
        return [export_target(d, self.settings.ae_title) for d in self.routing.destinations]

    def route_completed_studies(self) -> int:
        made = 0
        with self.sessions.begin() as session:
            for study_id in consume_completed_studies(session):
                try:
                    with session.begin_nested():
                        if reidentify_returned_study(session, self.routing, self.keys, study_id):
                            continue  # a result back from an outside destination: not routed
                        jobs = create_jobs(session, self.routing, study_id)
                        enqueue_sources(session, self.routing, jobs, self.keys)
                        made += len(jobs)
                except Exception:
                    log.exception("routing the study failed", study_id=study_id)
        if self.exporter is not None:
            self.exporter.wake()
        return made

    def fill(self) -> int:
        submitted = 0
        while len(self._running) < self.executor.slots:
            with self.sessions.begin() as session:
                job = claim_next(session, self.node)
                if job is None:
                    break
                spec = self._spec(session, job)
            gpu = self.settings.processing_device.startswith("cuda") or any(
                step in self._gpu_processors for step in spec.pipeline
            )
            started = time.monotonic()
            log.info("job submitted", job_id=job.id, rule=job.rule_name, attempt=job.attempts)
            try:
                future = self.executor.submit(spec, gpu=gpu)
            except Exception as exc:  # the executor is down (a remote scheduler gone)
                self._requeue(job.id, job.attempts - 1, f"could not submit: {exc}")
                break
            self._running[job.id] = _Running(
                job.id, future, started + self.settings.job_timeout_seconds, Path(spec.output_dir)
            )
            submitted += 1
        return submitted

    def _spec(self, session: Session, job: Job) -> JobSpec:
        paths = _series_paths(session, job.series_id)
        return JobSpec(
            job_id=job.id,
            series_instance_uid=job.series_instance_uid,
            paths=paths,
            pipeline=tuple(job.pipeline),
            params=job.params,
            output_dir=str(job_output_dir(Path(self.settings.outputs_dir), job.id, paths)),
            device=self.settings.processing_device,
            uid_root=self.settings.uid_root,
            plugin_choices=load_states(session),
            models=model_refs(session, self.settings, job.pipeline),
            key_file=self.settings.spool_encryption_key_file,
        )

    def stop_cancelled(self) -> list[int]:
        """Stop the runs of this node's jobs whose row says they no longer run here (an
        operator cancelled them, or took them back by force); their results, whenever they
        come, are not recorded. Returns their ids."""
        if not self._running:
            return []
        with self.sessions() as session:
            still_ours = set(
                session.scalars(
                    select(Job.id).where(
                        Job.id.in_(list(self._running)),
                        Job.state == JobState.RUNNING,
                        Job.claimed_by == self.node,
                    )
                )
            )
        stopped = [job_id for job_id in self._running if job_id not in still_ours]
        for job_id in stopped:
            running = self._running.pop(job_id)
            self.executor.kill(running.future)
            log.info("job no longer running here; its run stopped", job_id=job_id)
        return stopped

    def collect(self) -> int:
        """Record the outputs of steps that finished, and the jobs that finished."""
        for running in list(self._running.values()):
            for name, records in written_steps(running.output_dir, running.steps_seen):
                running.steps_seen.add(name)
                if records:
                    self._record_outputs(running.job_id, records)
        finished = [r for r in self._running.values() if r.future.done()]
        for running in finished:
            del self._running[running.job_id]
            try:
                result = running.future.result()
            except Exception as exc:
                reason = self.executor.describe_failure(exc)
                self._failed(running.job_id, reason, final=isinstance(exc, JobRefusedError))
            else:
                self._succeeded(running.job_id, result)
            finally:
                self.executor.forget(running.future)
        return len(finished)

    def enforce_timeouts(self) -> None:
        now = time.monotonic()
        for running in [r for r in self._running.values() if now > r.deadline]:
            if running.future.done():
                continue
            del self._running[running.job_id]
            timeout = self.settings.job_timeout_seconds
            self._failed(running.job_id, f"timed out after {timeout:g} s (job_timeout_seconds)")
            self.executor.kill(running.future)

    # -- recording outcomes ----------------------------------------------------------------

    def _export(self, session: Session, job: Job, rows: list[Output]) -> list[str]:
        """Enqueue ``rows`` for the job's destinations; notes on those that are gone."""
        destinations = {d.name: d for d in self.routing.destinations}
        notes = []
        for name in job.destinations:
            destination = destinations.get(name)
            if destination is None:
                notes.append(f"destination {name!r} is no longer defined; not sent there")
            elif rows and not destination.deidentify:  # it gets the source, de-identified
                enqueue(session, export_target(destination, self.settings.ae_title), rows)
        return notes

    def _record_outputs(self, job_id: int, records: list[OutputRecord]) -> None:
        """A step of a running job wrote these: record them and send them now."""
        with self.sessions.begin() as session:
            job = session.get(Job, job_id) if hold_running(session, job_id) else None
            if job is None:  # cancelled meanwhile: none of its outputs leave
                return
            self._export(session, job, upsert_outputs(session, records, job_id))
        if self.exporter is not None:
            self.exporter.wake()

    def _succeeded(self, job_id: int, result: JobResult) -> None:
        with self.sessions.begin() as session:
            job = session.get(Job, job_id) if hold_running(session, job_id) else None
            if job is None:
                log.info("job no longer running here; its result discarded", job_id=job_id)
                return
            rows = upsert_outputs(session, result.records, job_id)
            notes = list(result.problems) + self._export(session, job, rows)
            transition(
                session,
                job_id,
                JobState.SUCCEEDED,
                expected=JobState.RUNNING,
                finished_at=utcnow(),
                worker=result.worker,
                step_timings=timings_document(result.timings),
                num_outputs=len(rows),
                error="; ".join(notes) or None,
            )
            again = run_again(session, job_id, expected=JobState.SUCCEEDED)
        self.metrics.job_ended(job, JobState.SUCCEEDED, result.timings)
        if again:
            log.info("job queued again: its study completed again while it ran", job_id=job_id)
        log.info("job succeeded", job_id=job_id, outputs=len(result.records))
        if self.exporter is not None:
            self.exporter.wake()

    def _requeue(self, job_id: int, attempts: int, reason: str) -> None:
        """Back to queued without using an attempt: the job never ran."""
        with self.sessions.begin() as session:
            transition(
                session,
                job_id,
                JobState.QUEUED,
                expected=JobState.RUNNING,
                attempts=attempts,
                error=reason,
                claimed_by=None,
                not_before=utcnow() + dt.timedelta(seconds=RETRY_BASE_SECONDS),
            )
        log.error("job not submitted; queued again", job_id=job_id, error=reason)

    def _failed(self, job_id: int, reason: str, *, final: bool = False) -> None:
        """Retry the job after a backoff while it has attempts left, unless ``final`` (its
        pipeline cannot take its images: ``JobRefusedError``); else it failed."""
        with self.sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            retries = not final and job.attempts < job.max_attempts
            again = run_again(session, job_id, expected=JobState.RUNNING, error=reason)
            if again:
                ended = True
            elif retries:
                delay = RETRY_BASE_SECONDS * 2 ** (job.attempts - 1)
                ended = transition(
                    session,
                    job_id,
                    JobState.QUEUED,
                    expected=JobState.RUNNING,
                    error=reason,
                    not_before=utcnow() + dt.timedelta(seconds=delay),
                    claimed_by=None,
                )
            else:
                ended = transition(
                    session,
                    job_id,
                    JobState.FAILED,
                    expected=JobState.RUNNING,
                    error=reason,
                    finished_at=utcnow(),
                )
        if ended:  # not if an operator cancelled it meanwhile
            retrying = again or retries
            self.metrics.job_ended(job, RETRYING if retrying else JobState.FAILED)
        log.warning("job failed", job_id=job_id, error=reason)
