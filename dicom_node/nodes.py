"""Nodes sharing one database: heartbeats, and leases that run out.

Every node writes its row in ``nodes`` every ``node_heartbeat_seconds``. A node silent
for longer than ``node_lease_seconds`` is taken to be dead (or cut off: the same to the
others), and whichever live node notices first takes its work over, without a person:

- its ``running`` jobs go back to ``queued``, due now, the attempt it was making counted
  (a job out of attempts is ``failed``, saying why);
- its exports being sent (``sending``) go back to ``pending``, the attempt counted (one
  out of attempts is ``failed``).

Each take-over is a conditional update (still running, still claimed by the silent node),
so two live nodes noticing together do not both take a job. A node that was only cut off
and comes back finds its runs taken: its dispatcher stops them and records nothing
(``Dispatcher.stop_cancelled``, ``jobs.state.hold_running``); an instance it was sending
may reach the PACS twice, which the PACS takes as a duplicate (output UIDs are
deterministic). ``dicom-node nodes`` lists the nodes with their state.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Job, JobState, NodeHeartbeat, as_utc, utcnow
from db.upsert import insert_for
from dicom_node import __version__

log = structlog.get_logger(__name__)


def beat(session: Session, name: str, started_at: dt.datetime, now: dt.datetime) -> None:
    """Write this node's heartbeat (its row made or refreshed)."""
    values = {
        "name": name,
        "host": socket.gethostname()[:255],
        "pid": os.getpid(),
        "version": __version__[:64],
        "started_at": started_at,
        "heartbeat_at": now,
        "stopped_at": None,
    }
    insert = insert_for(session, NodeHeartbeat).values(values)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["name"], set_={k: v for k, v in values.items() if k != "name"}
        )
    )


def mark_stopped(session: Session, name: str, now: dt.datetime) -> None:
    session.execute(update(NodeHeartbeat).where(NodeHeartbeat.name == name).values(stopped_at=now))


def silent_nodes(session: Session, lease: dt.timedelta, now: dt.datetime, own: str) -> list[str]:
    """Nodes other than ``own`` whose last heartbeat is older than ``lease``."""
    return list(
        session.scalars(
            select(NodeHeartbeat.name).where(
                NodeHeartbeat.heartbeat_at < now - lease, NodeHeartbeat.name != own
            )
        )
    )


@dataclass
class TakeOver:
    """What was taken from a silent node: job ids queued again or failed; export ids."""

    node: str
    jobs_requeued: list[int] = field(default_factory=list)
    jobs_failed: list[int] = field(default_factory=list)
    exports_pending: list[int] = field(default_factory=list)
    exports_failed: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.jobs_requeued or self.jobs_failed or self.exports_pending or self.exports_failed
        )


def take_over(session: Session, silent: str, now: dt.datetime) -> TakeOver:
    """Take the running jobs and the exports being sent of the node ``silent``."""
    taken = TakeOver(silent)
    reason = f"node {silent} went silent (no heartbeat within its lease) while it ran this"
    running = session.execute(
        select(Job.id, Job.attempts, Job.max_attempts).where(
            Job.state == JobState.RUNNING, Job.claimed_by == silent
        )
    ).all()
    for job_id, attempts, max_attempts in running:
        out_of_attempts = attempts >= max_attempts
        values: dict[str, Any] = {"claimed_by": None, "error": reason}
        if out_of_attempts:
            values.update(state=JobState.FAILED, finished_at=now)
        else:
            values.update(state=JobState.QUEUED, not_before=now)
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.claimed_by == silent)
            .values(**values)
        ).rowcount  # type: ignore[attr-defined]
        if changed:
            (taken.jobs_failed if out_of_attempts else taken.jobs_requeued).append(job_id)
    sending = session.execute(
        select(Export.id, Export.attempts, Export.max_attempts).where(
            Export.state == ExportState.SENDING, Export.claimed_by == silent
        )
    ).all()
    for export_id, attempts, max_attempts in sending:
        out_of_attempts = attempts + 1 >= max_attempts
        state = ExportState.FAILED if out_of_attempts else ExportState.PENDING
        changed = session.execute(
            update(Export)
            .where(
                Export.id == export_id,
                Export.state == ExportState.SENDING,
                Export.claimed_by == silent,
            )
            .values(
                state=state,
                attempts=attempts + 1,
                claimed_by=None,
                next_attempt_at=now,
                last_error=reason,
            )
        ).rowcount  # type: ignore[attr-defined]
        if changed:
            (taken.exports_failed if out_of_attempts else taken.exports_pending).append(export_id)
    return taken


def take_over_silent_nodes(
    session: Session, own: str, lease: dt.timedelta, now: dt.datetime
) -> list[TakeOver]:
    return [
        taken
        for silent in silent_nodes(session, lease, now, own)
        if (taken := take_over(session, silent, now))
    ]


def list_nodes(session: Session, lease: dt.timedelta, now: dt.datetime) -> list[dict[str, Any]]:
    """Every node that ran on this database: its state (``running``, ``silent`` past its
    lease, ``stopped``), its heartbeat's age, its running jobs and exports being sent."""
    jobs = dict(
        session.execute(
            select(Job.claimed_by, func.count())
            .where(Job.state == JobState.RUNNING)
            .group_by(Job.claimed_by)
        ).all()
    )
    exports = dict(
        session.execute(
            select(Export.claimed_by, func.count())
            .where(Export.state == ExportState.SENDING)
            .group_by(Export.claimed_by)
        ).all()
    )
    rows = []
    for node in session.scalars(select(NodeHeartbeat).order_by(NodeHeartbeat.name)):
        heartbeat = as_utc(node.heartbeat_at)
        if node.stopped_at is not None:
            state = "stopped"
        elif now - heartbeat > lease:
            state = "silent"
        else:
            state = "running"
        rows.append(
            {
                "name": node.name,
                "state": state,
                "host": node.host,
                "pid": node.pid,
                "version": node.version,
                "started_at": as_utc(node.started_at).isoformat(),
                "heartbeat_seconds_ago": round((now - heartbeat).total_seconds(), 1),
                "running_jobs": int(jobs.get(node.name, 0)),
                "sending_exports": int(exports.get(node.name, 0)),
            }
        )
    return rows


class Heartbeat:
    """The node's heartbeat thread: beats every ``interval`` and takes over the work of
    nodes silent past ``lease``; ``on_taken`` (wake the dispatcher and exporter) runs
    after a take-over commits."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        name: str,
        interval: float,
        lease: float,
        on_taken: Callable[[], None] = lambda: None,
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.interval = interval
        self.lease = dt.timedelta(seconds=lease)
        self.on_taken = on_taken
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.once()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def once(self) -> list[TakeOver]:
        now = utcnow()
        with self.sessions.begin() as session:
            beat(session, self.name, self.started_at, now)
            taken = take_over_silent_nodes(session, self.name, self.lease, now)
        for each in taken:
            log.warning(
                "took over the work of a silent node",
                node=each.node,
                jobs_requeued=each.jobs_requeued,
                jobs_failed=each.jobs_failed,
                exports_pending=len(each.exports_pending),
                exports_failed=len(each.exports_failed),
            )
        if taken:
            self.on_taken()
        return taken

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.once()
            except Exception:  # the database away for a moment: beat again next time
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
        try:
            with self.sessions.begin() as session:
                mark_stopped(session, self.name, utcnow())
        except Exception:  # stopping anyway; the others will see the lease run out
            log.exception("could not mark the node stopped")
