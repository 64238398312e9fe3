"""The three chaos runs of issue 18, sized by the caller (CI sizes in the tests, the full
sizes in ``bench/chaos.py``): many senders at once, the PACS down during export, and
``kill -9`` of the node at random moments. Each returns the ``Census`` of what it left.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable
from pathlib import Path

from db.models import ExportState, JobState
from dicom_node.testing_chaos import (
    Census,
    ChaosNode,
    CountingPacs,
    all_done,
    census,
    counting_pacs,
    finish_sender,
    send_until_acknowledged,
    sop_uid,
    start_sender,
    wait_until,
    write_study,
)

Log = Callable[[str], None]

NODE_SETTINGS: dict[str, object] = {"study_quiet_seconds": 4.0, "dask_workers": 2}
"""The node of every run: ``ct_default_config`` (Dask executor, ct-default pipeline to the
PACS), studies complete after 4 s of quiet (on a busy machine a sender can stall for 2 s
between two instances, and the study would complete early), two Dask workers."""

KILL_POINTS = ("association", "job", "export", "start-up")
"""Where a kill lands: while a sender's association is open, while the study's job runs,
while outputs are being exported, and while the node starts."""


def _uids(paths: set[Path]) -> set[str]:
    return {sop_uid(path) for path in paths}


def load_run(
    root: Path, senders: int, instances: int, log: Log = print, timeout: float = 900.0
) -> Census:
    """``senders`` storescu processes at once, each with a study of ``instances``."""
    with counting_pacs(root / "pacs") as pacs:
        node = ChaosNode(root, pacs, **NODE_SETTINGS)
        node.start()
        try:
            studies = [
                write_study(root / "studies", f"load-{i}", instances) for i in range(senders)
            ]
            started = time.monotonic()
            running = [
                start_sender(files, node.port, f"MODALITY{i}") for i, files in enumerate(studies)
            ]
            acknowledged: set[Path] = set().union(*(finish_sender(s) for s in running))
            received = time.monotonic() - started
            log(f"{len(acknowledged)} instances from {senders} senders in {received:.1f} s")
            wait_until(lambda: all_done(node, senders), "processing and export", timeout, node=node)
            result = census(node, pacs, _uids(acknowledged))
            result.notes.append(
                f"received in {received:.1f} s; processed and delivered "
                f"{time.monotonic() - started:.1f} s after the first instance"
            )
            return result
        finally:
            node.stop()


def pacs_down_run(
    root: Path, outage_seconds: float, instances: int, log: Log = print, timeout: float = 900.0
) -> Census:
    """Stop the PACS as the first output reaches it, keep it down ``outage_seconds`` (and
    until the job is done), start it again on the same ports and storage;
    ``recover_seconds`` is from then until every output is delivered."""
    with counting_pacs(root / "pacs") as pacs:
        node = ChaosNode(root, pacs, **NODE_SETTINGS)
        node.start()
        try:
            files = write_study(root / "studies", "outage", instances)
            acknowledged = send_until_acknowledged(files, node.port, "MODALITY")
            wait_until(
                lambda: bool(pacs.stores()), "a first output", timeout, node=node, interval=0.02
            )
            pacs.stop()
            down_at = time.monotonic()
            stored = sum(pacs.stores().values())
            log(f"PACS stopped after {stored} stores; down {outage_seconds:g} s")
            while time.monotonic() - down_at < outage_seconds:
                node.alive()
                time.sleep(min(1.0, outage_seconds))
            # At least until the job is done: then every output waits for the PACS, and
            # the time to recover is the exporter's alone.
            wait_until(lambda: _jobs_finished(node), "the job", timeout, node=node)
            waiting = [e for e in node.exports() if e.state != ExportState.DELIVERED]
            pacs.start()
            back = dt.datetime.now(dt.UTC)
            latest = max((_aware(e.next_attempt_at) for e in waiting), default=back)
            attempts = max((e.attempts for e in waiting), default=0)
            recover = wait_until(
                lambda: all_done(node, 1), "delivery after the outage", timeout, node=node
            )
            result = census(node, pacs, _uids(acknowledged))
            result.recover_seconds.append(recover)
            result.notes.append(
                f"at the PACS's return {len(waiting)} exports waited, after up to {attempts} "
                f"attempts, the last one due {(latest - back).total_seconds():.1f} s later"
            )
            return result
        finally:
            node.stop()


def _jobs_finished(node: ChaosNode) -> bool:
    jobs = node.jobs()
    return bool(jobs) and all(job.state in (JobState.SUCCEEDED, JobState.FAILED) for job in jobs)


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


class _KillRun:
    """One run of studies with kills: the node, the PACS, what was acknowledged."""

    def __init__(self, root: Path, pacs: CountingPacs, rng: random.Random, log: Log) -> None:
        self.root, self.pacs, self.rng, self.log = root, pacs, rng, log
        self.node = ChaosNode(root, pacs, **NODE_SETTINGS)
        self.acknowledged: set[Path] = set()
        self.kills: list[str] = []
        self.restarts: list[float] = []
        self.last_restart = time.monotonic()
        self.start_up_kills = 0

    def restart(self) -> None:
        """Start the node again; a start-up kill planned meanwhile strikes first."""
        while self.start_up_kills:
            self.start_up_kills -= 1
            self._kill_in_start_up()
        started = time.monotonic()
        self.node.start()
        self.last_restart = time.monotonic()
        self.restarts.append(self.last_restart - started)

    def kill(self, point: str, detail: str) -> None:
        self.node.kill()
        self.kills.append(f"{point}: {detail}")
        self.log(f"kill {len(self.kills)} ({point}): {detail}")

    def send(self, files: list[Path], kill_mid_association: bool, timeout: float) -> None:
        if not kill_mid_association:
            self.acknowledged |= send_until_acknowledged(files, self.node.port, "MODALITY")
            return
        stored_before = len(self.node.spool_uids())
        after = self.rng.randint(1, len(files) - 1)
        sender = start_sender(files, self.node.port, "MODALITY")
        wait_until(
            lambda: (
                len(self.node.spool_uids()) - stored_before >= after or sender.poll() is not None
            ),
            "instances in the spool",
            timeout,
            interval=0.005,
        )
        open_association = sender.poll() is None
        self.kill(
            "association",
            f"after {after} of {len(files)} instances stored, sender "
            + ("still sending" if open_association else "already done"),
        )
        self.acknowledged |= finish_sender(sender)
        self.restart()
        missing = [path for path in files if path not in self.acknowledged]
        self.acknowledged |= send_until_acknowledged(missing, self.node.port, "MODALITY")

    def kill_in_job(self, study_uid: str, timeout: float) -> None:
        def running() -> bool:
            return any(
                job.study_instance_uid == study_uid and job.state == JobState.RUNNING
                for job in self.node.jobs()
            )

        wait_until(running, "the study's job to run", timeout, node=self.node, interval=0.1)
        pause = self.rng.uniform(0.0, 3.0)
        time.sleep(pause)
        job = [j for j in self.node.jobs() if j.study_instance_uid == study_uid]
        self.kill("job", f"{pause:.1f} s after its job ran, job now {job[0].state if job else '?'}")
        self.restart()

    def kill_in_export(self, timeout: float) -> None:
        stored = sum(self.pacs.stores().values())
        wait_until(
            lambda: sum(self.pacs.stores().values()) > stored,
            "outputs reaching the PACS",
            timeout,
            node=self.node,
            interval=0.02,
        )
        time.sleep(self.rng.uniform(0.0, 0.5))
        self.node.kill()
        undelivered = sum(1 for e in self.node.exports() if e.state != ExportState.DELIVERED)
        self.kills.append(f"export: {undelivered} exports not yet delivered")
        self.log(f"kill {len(self.kills)} (export): {undelivered} exports not yet delivered")
        self.restart()

    def kill_anywhere(self) -> None:
        """A kill at a random moment of whatever the node is doing (for a start-up kill
        planned where no other kill is)."""
        pause = self.rng.uniform(0.0, 3.0)
        time.sleep(pause)
        self.kill("anywhere", f"{pause:.1f} s after the study was sent")
        self.restart()

    def _kill_in_start_up(self) -> None:
        spawned = self.node.spawn()
        pause = self.rng.uniform(0.3, 5.0)
        time.sleep(pause)
        alive = spawned.poll() is None
        spawned.kill()
        spawned.wait()
        self.kills.append(
            f"start-up: {pause:.1f} s after start ({'running' if alive else 'had exited'})"
        )
        self.log(f"kill {len(self.kills)} (start-up): {pause:.1f} s after start")


def kill_run(
    root: Path,
    studies: int,
    kill_points: list[str],
    instances: int,
    seed: int,
    log: Log = print,
    timeout: float = 600.0,
) -> Census:
    """Send ``studies`` one after the other; the i-th kill point (shuffled by ``seed``)
    strikes during the (i mod studies)-th study, at a random moment of its kind. After
    each kill the node starts again on its data and the sender re-sends what it did not
    see acknowledged. ``recover_seconds``: from the last restart to everything delivered."""
    rng = random.Random(seed)
    points = list(kill_points)
    rng.shuffle(points)
    log(f"chaos seed {seed}: kills {points}")
    plan: dict[int, list[str]] = {}
    for index, point in enumerate(points):
        plan.setdefault(index % studies, []).append(point)
    with counting_pacs(root / "pacs") as pacs:
        run = _KillRun(root, pacs, rng, log)
        run.restart()
        try:
            for index in range(studies):
                files = write_study(root / "studies", f"chaos-{seed}-{index}", instances)
                study_uid = _study_uid(files[0])
                here = plan.get(index, [])
                run.start_up_kills += here.count("start-up")
                run.send(files, "association" in here, timeout)
                if set(here) == {"start-up"}:
                    run.kill_anywhere()
                if "job" in here:
                    run.kill_in_job(study_uid, timeout)
                if "export" in here:
                    run.kill_in_export(timeout)
            recover = wait_until(
                lambda: all_done(run.node, studies), "every study delivered", timeout, node=run.node
            )
            result = census(run.node, pacs, _uids(run.acknowledged))
            result.kills = len(run.kills)
            result.recover_seconds.append(time.monotonic() - run.last_restart)
            result.notes += run.kills
            result.notes.append(
                "restarts (s): "
                + ", ".join(f"{s:.1f}" for s in run.restarts)
                + f"; waited {recover:.1f} s after the last study for everything to be delivered"
            )
            return result
        finally:
            run.node.stop()


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
