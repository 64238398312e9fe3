"""Noticing that a destination is back after an outage.

A destination that cannot be reached costs each of its rows an attempt, and the next
attempt waits 2 s, 4 s, 8 s ... at most 10 min: after a 5-minute outage the rows would
wait up to another 4 minutes once the PACS is back. So after a round in which a
destination delivered nothing, the exporter opens a TCP connection to it every
``interval`` seconds; once one of those probes has failed (it is down) and a later one
succeeds (it is back), the destination's pending rows are due at once. A destination that
answers the probe but refuses the instances (a failure status, an association rejected)
is never seen down by a probe, so its rows keep their backoff.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState
from dicom_node.export.queue import DeliveryReport, utcnow
from dicom_node.export.target import ExportTarget

log = structlog.get_logger(__name__)

PROBE_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 2.0


def can_connect(target: ExportTarget) -> bool:
    """Whether a TCP connection to the destination's DICOM port (or its URL's) opens."""
    if target.url is not None:
        parts = urllib.parse.urlsplit(target.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
    else:
        host, port = target.host, target.port
    try:
        with socket.create_connection((host, port), min(PROBE_TIMEOUT_SECONDS, target.timeout)):
            return True
    except OSError:
        return False


@dataclass
class _Watch:
    next_probe: float
    seen_down: bool = False


class ReachabilityProbe:
    """Which destinations came back: ``observe`` each round's report, then ``back``."""

    def __init__(
        self,
        connect: Callable[[ExportTarget], bool] = can_connect,
        interval: float = PROBE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect, self.interval, self.clock = connect, interval, clock
        self._watched: dict[str, _Watch] = {}

    def observe(self, report: DeliveryReport) -> None:
        """Watch a destination that delivered nothing this round; one that delivered is fine."""
        attempted = set(report.destinations.values())
        delivered = {report.destinations[i] for i in report.delivered if i in report.destinations}
        for name in attempted - delivered:
            self._watched.setdefault(name, _Watch(self.clock() + self.interval))
        for name in delivered:
            self._watched.pop(name, None)

    def back(self, targets: Iterable[ExportTarget]) -> list[str]:
        """Probe the watched destinations that are due; the names of those seen down
        before and reachable now (no longer watched)."""
        now, back = self.clock(), []
        for target in targets:
            watch = self._watched.get(target.name)
            if watch is None or now < watch.next_probe:
                continue
            if not self.connect(target):
                watch.seen_down, watch.next_probe = True, now + self.interval
                continue
            del self._watched[target.name]
            if watch.seen_down:
                back.append(target.name)
        return back


def due_now(
    sessions: sessionmaker[Session], destination: str, now: dt.datetime | None = None
) -> int:
    """Make the destination's pending rows due now (their attempts kept); how many."""
    now = now or utcnow()
    with sessions() as session, session.begin():
        changed = session.execute(
            update(Export)
            .where(
                Export.destination == destination,
                Export.state == ExportState.PENDING,
                Export.next_attempt_at > now,
            )
            .values(next_attempt_at=now)
        ).rowcount  # type: ignore[attr-defined]
    return int(changed)
