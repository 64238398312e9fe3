"""The pieces of the chaos runs (issue 18), for ``tests/interop/test_chaos.py`` and
``bench/chaos.py``: a PACS that counts every C-STORE it stores, senders that know what
was acknowledged, a node that can be killed and started again on its data, and the
census that says what was lost and what was sent twice.

How a second send is seen: Orthanc keeps one instance per SOP Instance UID, so its
instance count cannot show a re-send (it answers a duplicate with success and stores
nothing). Its Lua filter ``ReceivedInstanceFilter`` runs for every C-STORE it receives, a
duplicate included, before it answers, and appends the instance's UID to a file: lines
minus the instances Orthanc holds is the number of re-sends it absorbed. (The
``OnStoredInstance`` hook also sees duplicates, but it runs later on a queue that a stop
of Orthanc drops: it missed the last stores before each outage.)
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from db.models import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Output,
    OutputKind,
    Series,
    Study,
    StudyEvent,
)
from db.session import make_engine
from dicom_node.synthetic import generate_series
from dicom_node.testing import (
    NodeProcess,
    OrthancProcess,
    ct_default_config,
    dcmtk_env,
    free_port,
    node_env,
    require_tool,
    running_orthanc,
    start_node,
)

STORED_HOOK = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open("{log}", "a")
  log:write(dicom["SOPInstanceUID"] .. "\\n")
  log:close()
  return true
end
"""


class CountingPacs:
    """A real Orthanc that appends the UID of every instance it receives (each C-STORE, a
    duplicate too) to ``stores_log``; ``stop`` and ``start`` give the same PACS back on the
    same ports and storage, as after an outage."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.stores_log = work_dir / "stores.log"
        self.hook = work_dir / "count-stores.lua"
        self.hook.write_text(STORED_HOOK.format(log=self.stores_log))
        self.dicom_port, self.http_port = free_port(), free_port()
        self._running: contextlib.ExitStack | None = None
        self._orthanc: OrthancProcess | None = None

    @property
    def orthanc(self) -> OrthancProcess:
        if self._orthanc is None:
            raise RuntimeError("the PACS is not running")
        return self._orthanc

    def start(self) -> OrthancProcess:
        stack = contextlib.ExitStack()
        self._orthanc = stack.enter_context(
            running_orthanc(
                self.work_dir / "orthanc",
                dicom_port=self.dicom_port,
                http_port=self.http_port,
                extra_config={"LuaScripts": [str(self.hook)]},
            )
        )
        self._running = stack
        return self._orthanc

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
        self._running = self._orthanc = None

    def instance_uids(self) -> Counter[str]:
        """SOP Instance UID -> how many instances Orthanc's index holds with it."""
        found: list[dict[str, Any]] = self.orthanc.get_json("/instances?expand")  # type: ignore[assignment]
        return Counter(item["MainDicomTags"]["SOPInstanceUID"] for item in found)

    def count(self) -> int:
        statistics: dict[str, Any] = self.orthanc.get_json("/statistics")  # type: ignore[assignment]
        return int(statistics["CountInstances"])

    def stores(self) -> Counter[str]:
        """SOP Instance UID -> how many C-STOREs of it the PACS received (re-sends included)."""
        if not self.stores_log.exists():
            return Counter()
        return Counter(self.stores_log.read_text().split())

    def settled_stores(self, timeout: float = 60.0) -> Counter[str]:
        """``stores`` once the hook has caught up (it runs a moment after each store)."""
        deadline = time.monotonic() + timeout
        stores = self.stores()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            again = self.stores()
            if again == stores and set(again) >= set(self.instance_uids()):
                return again
            stores = again
        return stores


@contextlib.contextmanager
def counting_pacs(work_dir: Path) -> Iterator[CountingPacs]:
    pacs = CountingPacs(work_dir)
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


# -- senders ---------------------------------------------------------------------------------


def write_study(root: Path, name: str, instances: int, size: int = 64) -> list[Path]:
    """A CT study of one series of ``instances`` slices (UIDs from ``name``) as files."""
    series = generate_series(num_slices=instances, rows=size, columns=size, uid_seed=name)
    return series.write(root / name)


_SENT = re.compile(r"^I: Sending file: (.+)$")
_ANSWER = re.compile(r"^I: Received Store Response \((.+)\)")


def acknowledged(output: str) -> set[Path]:
    """The files a ``storescu -v`` run saw acknowledged (a success or warning answer)."""
    done: set[Path] = set()
    current: Path | None = None
    for line in output.splitlines():
        if sent := _SENT.match(line):
            current = Path(sent.group(1))
        elif (answer := _ANSWER.match(line)) and current is not None:
            if answer.group(1).startswith(("Success", "Warning")):
                done.add(current)
            current = None
    return done


def start_sender(files: list[Path], port: int, calling_ae: str) -> subprocess.Popen[str]:
    """``storescu -v`` of ``files`` to the node, running (a modality sending a study)."""
    return subprocess.Popen(
        [
            require_tool("storescu"),
            "-v",
            *("-aet", calling_ae, "-aec", "DICOMNODE"),
            *("127.0.0.1", str(port)),
            *map(str, files),
        ],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_sender(sender: subprocess.Popen[str], timeout: float = 600.0) -> set[Path]:
    output, _ = sender.communicate(timeout=timeout)
    return acknowledged(output)


def send_until_acknowledged(
    files: list[Path], port: int, calling_ae: str, tries: int = 20
) -> set[Path]:
    """Send, and send again what was not acknowledged, as a modality retries (the node
    may be starting)."""
    done: set[Path] = set()
    for _ in range(tries):
        missing = [path for path in files if path not in done]
        if not missing:
            return done
        done |= finish_sender(start_sender(missing, port, calling_ae))
        if len(done) < len(files):
            time.sleep(1.0)
    raise AssertionError(f"{len(files) - len(done)} of {len(files)} never acknowledged")


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- the node --------------------------------------------------------------------------------


class ChaosNode:
    """A node (the ``ct-default`` rule to the PACS) that can be killed at any moment and
    started again on the same port and data folder."""

    def __init__(self, root: Path, pacs: CountingPacs, **settings: object) -> None:
        self.data_dir = root / "data"
        self.config = root / "node.toml"
        self.config.write_text(ct_default_config(pacs.orthanc, self.data_dir, **settings))
        self.port = free_port()
        self.process: NodeProcess | None = None
        self._engine: Engine | None = None

    def start(self, timeout: float = 180.0) -> NodeProcess:
        try:
            self.process = start_node(
                self.data_dir, port=self.port, config=self.config, timeout=timeout
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nholding port {self.port}: {self._holders()}") from exc
        return self.process

    def _holders(self) -> str:
        """The processes listening on the node's port, with their parents (a diagnosis)."""
        listing = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{self.port}"], capture_output=True, text=True, check=False
        ).stdout
        found = []
        for pid in sorted(set(re.findall(r"pid=(\d+)", listing))):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                parent = re.search(r"PPid:\s+(\d+)", status)
                found.append(f"{pid} (parent {parent.group(1) if parent else '?'}): {command}")
        return "; ".join(found) or "none"

    def spawn(self) -> subprocess.Popen[bytes]:
        """``dicom-node serve`` started without waiting for it: to be killed in start-up."""
        env = node_env(self.data_dir, self.port)
        log_path = self.data_dir.parent / f"node-{self.port}.log"
        with log_path.open("ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir.parent,
            )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            self.process.stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def alive(self) -> None:
        if self.process is None or self.process.process.poll() is not None:
            log = self.process.log()[-4000:] if self.process else ""
            raise AssertionError(f"the node is not running:\n{log}")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(f"sqlite:///{self.data_dir / 'dicom-node.db'}")
        return self._engine

    def spool_uids(self) -> set[str]:
        return {path.stem for path in (self.data_dir / "spool").glob("*/*/*.dcm")}

    def indexed_uids(self) -> set[str]:
        with self.engine.connect() as connection:
            return set(connection.scalars(select(Instance.sop_instance_uid)))

    def jobs(self) -> list[JobRow]:
        query = select(
            Job.id, Study.study_instance_uid, Job.state, Job.attempts, Job.num_outputs, Job.error
        ).join(Study, Study.id == Job.study_id)
        with self.engine.connect() as connection:
            return [JobRow(*row) for row in connection.execute(query)]

    def output_uids(self) -> set[str]:
        with self.engine.connect() as connection:
            return set(connection.scalars(select(Output.sop_instance_uid)))

    def series_not_covered(self) -> dict[str, tuple[int, int]]:
        """Series whose derived outputs are fewer than their instances (processed before
        the last ones arrived): series UID -> (instances, derived outputs)."""
        instances = (
            select(Series.series_instance_uid, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .group_by(Series.series_instance_uid)
        )
        derived = (
            select(Output.source_series_uid, func.count(Output.id))
            .where(Output.kind == OutputKind.DERIVED)
            .group_by(Output.source_series_uid)
        )
        with self.engine.connect() as connection:
            received = {uid: int(count) for uid, count in connection.execute(instances)}
            made = {uid: int(count) for uid, count in connection.execute(derived)}
        return {
            uid: (count, made.get(uid, 0))
            for uid, count in received.items()
            if made.get(uid, 0) < count
        }

    def series_history(self, series_uid: str) -> str:
        """What happened to a series's study: its completions and reopenings, its jobs."""
        with self.engine.connect() as connection:
            study_id = connection.scalar(
                select(Series.study_id).where(Series.series_instance_uid == series_uid)
            )
            events = Counter(
                connection.scalars(select(StudyEvent.event).where(StudyEvent.study_id == study_id))
            )
            jobs = connection.execute(
                select(Job.id, Job.state, Job.attempts, Job.num_outputs).where(
                    Job.study_id == study_id
                )
            ).all()
        return f"events {dict(events)}, jobs (id, state, attempts, outputs) {jobs}"

    def failed_attempts(self, sop_instance_uids: Collection[str]) -> dict[str, list[str]]:
        """For each instance, the reasons its export attempts failed (the audit trail)."""
        query = (
            select(AuditEvent.sop_instance_uid, AuditEvent.reason)
            .where(
                AuditEvent.action == AuditAction.OUTPUT_EXPORTED,
                AuditEvent.outcome != AuditOutcome.SUCCESS,
                AuditEvent.sop_instance_uid.in_(sorted(sop_instance_uids)),
            )
            .order_by(AuditEvent.id)
        )
        reasons: dict[str, list[str]] = {}
        with self.engine.connect() as connection:
            for uid, reason in connection.execute(query):
                reasons.setdefault(str(uid), []).append(reason or "no reason")
        return reasons

    def exports(self) -> list[ExportRow]:
        query = select(
            Export.sop_instance_uid,
            Export.state,
            Export.attempts,
            Export.next_attempt_at,
        )
        with self.engine.connect() as connection:
            return [ExportRow(*row) for row in connection.execute(query)]


@dataclass(frozen=True)
class JobRow:
    id: int
    study_instance_uid: str
    state: str
    attempts: int
    outputs: int | None
    error: str | None


@dataclass(frozen=True)
class ExportRow:
    sop_instance_uid: str
    state: str
    attempts: int
    next_attempt_at: Any


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    *,
    node: ChaosNode | None = None,
    interval: float = 0.5,
) -> float:
    """Poll ``condition`` until it holds (seconds it took); fail with ``what`` after
    ``timeout`` or when the node exits meanwhile."""
    started = time.monotonic()
    while not condition():
        if node is not None:
            node.alive()
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def all_done(node: ChaosNode, studies: int) -> bool:
    """Every study has its job succeeded and every export is delivered; a job or an export
    that failed for good fails the run at once."""
    jobs = node.jobs()
    failed = [job for job in jobs if job.state == JobState.FAILED]
    if failed:
        raise AssertionError(f"jobs failed: {failed}")
    exports = node.exports()
    dead = [e for e in exports if e.state == ExportState.FAILED]
    if dead:
        raise AssertionError(f"{len(dead)} exports failed for good, e.g. {dead[0]}")
    finished = len(jobs) >= studies and all(job.state == JobState.SUCCEEDED for job in jobs)
    return finished and bool(exports) and all(e.state == ExportState.DELIVERED for e in exports)


# -- the census -------------------------------------------------------------------------------


@dataclass
class Census:
    """What the run left, counted from the spool, the index, the node's records and the PACS."""

    acknowledged: int
    in_spool: int
    in_index: int
    lost_instances: int
    studies: int
    jobs_succeeded: int
    outputs: int
    delivered: int
    in_pacs: int
    lost_outputs: int
    duplicates: int
    extra_outputs: int
    """Outputs recorded beyond what the jobs' last runs made: a job run again on the same
    series under new UIDs (a duplicate), or an earlier run on a series that grew since."""
    pacs_stores: int
    spool_total: int
    index_total: int
    series_not_covered: dict[str, tuple[int, int]]
    kills: int = 0
    recover_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.lost_instances + self.lost_outputs

    @property
    def resends(self) -> int:
        """C-STOREs of an output the PACS already had (absorbed: it keeps one copy); a
        lower bound when the hook recorded fewer stores than the PACS holds (see notes)."""
        return max(0, self.pacs_stores - self.in_pacs)

    def lines(self) -> list[str]:
        recover = ", ".join(f"{s:.1f}" for s in self.recover_seconds) or "-"
        return [
            f"instances acknowledged {self.acknowledged}, of them in spool {self.in_spool} "
            f"and indexed {self.in_index} (all in spool {self.spool_total}, indexed "
            f"{self.index_total}), lost {self.lost_instances}",
            f"studies {self.studies}, jobs succeeded {self.jobs_succeeded}, kills {self.kills}, "
            f"series processed short of their instances {len(self.series_not_covered)}",
            f"outputs {self.outputs}, exports delivered {self.delivered}, in PACS {self.in_pacs}, "
            f"lost {self.lost_outputs}",
            f"duplicates {self.duplicates}, outputs beyond the jobs' last runs "
            f"{self.extra_outputs}, C-STOREs received by the PACS {self.pacs_stores} "
            f"(re-sends absorbed {self.resends})",
            f"time to recover (s): {recover}",
            *self.notes,
        ]


def census(node: ChaosNode, pacs: CountingPacs, acknowledged_uids: set[str]) -> Census:
    """Count everything. ``duplicates``: several export rows or PACS instances for one
    UID, and PACS instances that are no output of the node; ``extra_outputs``: outputs
    beyond what the jobs' last runs made; ``resends``: C-STOREs the PACS absorbed."""
    spool, index = node.spool_uids(), node.indexed_uids()
    jobs = node.jobs()
    succeeded = [job for job in jobs if job.state == JobState.SUCCEEDED]
    outputs = node.output_uids()
    exports = node.exports()
    export_rows = Counter(e.sop_instance_uid for e in exports)
    delivered = {e.sop_instance_uid for e in exports if e.state == ExportState.DELIVERED}
    in_pacs = pacs.instance_uids()
    stores = pacs.settled_stores()
    made = sum(job.outputs or 0 for job in succeeded)
    duplicates = (
        sum(count - 1 for count in export_rows.values())
        + sum(count - 1 for count in in_pacs.values())
        + len(set(in_pacs) - outputs)
    )
    notes = [
        f"series {uid}: {instances} instances, {derived} derived outputs; "
        + node.series_history(uid)
        for uid, (instances, derived) in node.series_not_covered().items()
    ]
    unrecorded = set(in_pacs) - set(stores)
    if unrecorded:
        notes.append(
            f"the PACS's hook did not record {len(unrecorded)} of the instances it holds: "
            "re-sends are a lower bound"
        )
    resent = {uid: count for uid, count in stores.items() if count > 1}
    if resent:
        attempts = {e.sop_instance_uid: e.attempts for e in exports if e.sop_instance_uid in resent}
        shown = list(resent)[:5]
        failures = node.failed_attempts(shown)
        details = {uid: (resent[uid], attempts.get(uid), failures.get(uid)) for uid in shown}
        notes.append(
            "received more than once (UID: C-STOREs, export attempts, failed attempts' "
            f"reasons): {details} ({len(resent)} UIDs)"
        )
    return Census(
        notes=notes,
        acknowledged=len(acknowledged_uids),
        in_spool=len(spool & acknowledged_uids),
        in_index=len(index & acknowledged_uids),
        lost_instances=len(acknowledged_uids - (spool & index)),
        studies=len({job.study_instance_uid for job in succeeded}),
        jobs_succeeded=len(succeeded),
        outputs=len(outputs),
        delivered=len(delivered & outputs),
        in_pacs=pacs.count(),
        lost_outputs=len(outputs - set(in_pacs)),
        duplicates=duplicates,
        extra_outputs=max(0, len(outputs) - made),
        pacs_stores=sum(stores.values()),
        spool_total=len(spool),
        index_total=len(index),
        series_not_covered=node.series_not_covered(),
    )
