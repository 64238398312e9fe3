"""A destination back after an outage gets its pending rows at once, not after their backoff."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db.models import ExportState
from dicom_node.export.probe import ReachabilityProbe, can_connect
from dicom_node.export.queue import DeliveryReport, RetryPolicy, enqueue
from dicom_node.export.target import ExportTarget
from dicom_node.export.worker import Exporter
from dicom_node.testing import free_port, running_storescp
from tests.dicom_node.export.export_support import rows

PACS = ExportTarget("pacs", "127.0.0.1", 1, "PACS")


def failed_round(name: str = "pacs") -> DeliveryReport:
    return DeliveryReport(claimed=1, retrying=[1], destinations={1: name})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_destination_seen_down_then_reachable_is_back() -> None:
    reachable, clock = [False], Clock()
    probe = ReachabilityProbe(lambda _target: reachable[0], interval=5, clock=clock)
    probe.observe(failed_round())
    assert probe.back([PACS]) == []  # not probed before the interval
    clock.now = 5
    assert probe.back([PACS]) == []  # probed: down
    probe.observe(failed_round())  # rows failing meanwhile keep it watched as seen down
    reachable[0], clock.now = True, 7
    assert probe.back([PACS]) == []  # the next probe is due at 10
    clock.now = 10
    assert probe.back([PACS]) == ["pacs"]
    clock.now = 20
    assert probe.back([PACS]) == []  # no longer watched


def test_a_destination_that_answers_but_refuses_keeps_its_backoff() -> None:
    clock = Clock()
    probe = ReachabilityProbe(lambda _target: True, interval=5, clock=clock)
    probe.observe(failed_round())  # e.g. every instance refused with a failure status
    clock.now = 5
    assert probe.back([PACS]) == []  # it answered the probe: never seen down
    probe.observe(failed_round())
    clock.now = 10
    assert probe.back([PACS]) == []


def test_a_delivery_ends_the_watch() -> None:
    clock = Clock()
    probe = ReachabilityProbe(lambda _target: False, interval=5, clock=clock)
    probe.observe(failed_round())
    probe.observe(DeliveryReport(claimed=1, delivered=[2], destinations={2: "pacs"}))
    clock.now = 5
    probe.connect = lambda _target: True
    assert probe.back([PACS]) == []


def test_can_connect_to_a_listening_port_only(tmp_path: Path) -> None:
    port = free_port()
    target = ExportTarget("pacs", "127.0.0.1", port, "PACS")
    assert not can_connect(target)
    with running_storescp(tmp_path / "received", port):
        assert can_connect(target)
    web = ExportTarget("web", "", 0, "", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    assert not can_connect(web)


def test_exporter_sends_at_once_when_the_destination_returns_not_after_its_backoff(
    sessions: sessionmaker[Session], series_files: list[Path], tmp_path: Path
) -> None:
    port = free_port()
    target = ExportTarget("pacs", "127.0.0.1", port, "STORESCP", timeout=5.0)
    with sessions() as session, session.begin():
        enqueue(session, target, series_files[:2])
    slow = RetryPolicy(base_seconds=300.0, jitter=0.0)  # the next attempt in 5 minutes
    exporter = Exporter(
        sessions, [target], interval=0.05, policy=slow, probe=ReachabilityProbe(interval=0.2)
    )
    exporter.start()
    try:
        deadline = time.monotonic() + 60
        while not all(r.attempts == 1 for r in rows(sessions)):
            assert time.monotonic() < deadline, rows(sessions)
            time.sleep(0.05)
        time.sleep(1.0)  # probes see it down
        with running_storescp(tmp_path / "received", port):
            deadline = time.monotonic() + 60
            while not all(r.state == ExportState.DELIVERED for r in rows(sessions)):
                assert time.monotonic() < deadline, rows(sessions)
                time.sleep(0.1)
    finally:
        exporter.stop(timeout=10)
    assert [r.attempts for r in rows(sessions)] == [2, 2]
    assert len(list((tmp_path / "received").iterdir())) == 2
