"""The sending side of export: ``deliver_due`` and the ``Exporter`` thread that runs it.

Each round claims the due rows of the configured destinations (``queue.claim``), sends
each destination's batch with the transport of its kind (``TRANSPORTS``: C-STORE or
STOW-RS), and records what became of every row (``queue.record``: delivered, retried
after a backoff, or failed for good). The rows the peer acknowledged are recorded
delivered while the batch is still being sent (``DeliveredCheckpoint``), so a node killed
mid-batch sends again only the instances it had not yet recorded. A failure status for
one instance costs only that instance an attempt; a destination that cannot be reached
costs every instance of the batch one. On start the ``Exporter`` puts rows left
``sending`` by a crash back to ``pending``, so a restart resumes what was under way
(at-least-once delivery).
"""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ae.commitment import PendingTransactions
from dicom_node.export import cstore, stowrs
from dicom_node.export.commitment import request_due
from dicom_node.export.probe import ReachabilityProbe, due_now
from dicom_node.export.queue import (
    Claimed,
    DeliveryReport,
    RetryPolicy,
    claim,
    record,
    recover_interrupted,
    utcnow,
)
from dicom_node.export.target import ExportTarget, TransportKind
from dicom_node.export.transport import Outcome, Transport
from dicom_node.metrics import NodeMetrics
from dicom_node.scu import SendFile, scan_files
from dicom_node.security.keys import KeyRing

log = structlog.get_logger(__name__)

TRANSPORTS: dict[TransportKind, Transport] = {"c-store": cstore, "stow-rs": stowrs}
"""How each kind of destination is sent to: one module per transport."""

CHECKPOINT_SECONDS = 0.25
"""While a batch is sent, the rows the peer acknowledged are recorded delivered this often."""


class DeliveredCheckpoint:
    """Records rows delivered as the peer acknowledges their instances, while the batch is
    still being sent: ``acknowledged`` is the transport's ``on_sent`` (called from its
    sending threads), and a thread of its own writes what was acknowledged every
    ``CHECKPOINT_SECONDS``, so the sending never waits on the database. Without it a
    batch's outcomes were written once it had all gone, and a node killed mid-batch sent
    the whole batch again (docs/benchmarks.md, Chaos). ``recorded`` holds the ids written;
    a write that fails, and what is acknowledged after the last write, are left to the
    batch's final record."""

    def __init__(self, write: Callable[[list[int]], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._waiting: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="export-checkpoint", daemon=True)
        self.recorded: set[int] = set()

    def __enter__(self) -> DeliveredCheckpoint:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def acknowledged(self, export_id: int, status: int | None) -> None:
        if cstore.stored(status):
            with self._lock:
                self._waiting.append(export_id)

    def _run(self) -> None:
        while not self._stop.wait(CHECKPOINT_SECONDS):
            with self._lock:
                ids, self._waiting = self._waiting, []
            if not ids:
                continue
            try:
                self._write(ids)
            except Exception:  # the batch's final record writes them instead
                log.warning("export checkpoint not written", exc_info=True, exports=len(ids))
                continue
            self.recorded.update(ids)


def _send_batch(
    target: ExportTarget,
    batch: list[Claimed],
    on_sent: Callable[[int, int | None], None] | None,
    keys: KeyRing | None = None,
) -> dict[int, Outcome]:
    """Read each claimed file's header, send the readable ones, an outcome per export id."""
    outcomes: dict[int, Outcome] = {}
    files: list[SendFile] = []
    export_of: dict[Path, list[int]] = {}
    for claimed in batch:
        try:
            found, skipped = scan_files([Path(claimed.path)], keys)
        except FileNotFoundError:
            outcomes[claimed.id] = Outcome(False, f"file missing: {claimed.path}")
            continue
        if not found:
            reason = skipped[0][1] if skipped else "not a DICOM file"
            outcomes[claimed.id] = Outcome(False, f"{claimed.path}: {reason}")
            continue
        if found[0].path not in export_of:
            files.append(found[0])
        export_of.setdefault(found[0].path, []).append(claimed.id)
    if not files:
        return outcomes

    def sent(item: SendFile, status: int | None) -> None:
        if on_sent is not None:
            for export_id in export_of[item.path]:
                on_sent(export_id, status)

    try:
        by_path = TRANSPORTS[target.kind].send(target, files, sent)
        missing = Outcome(False, f"the {target.kind} transport gave no outcome")
    except Exception as exc:  # a transport should answer, not raise; the rows must not hang
        log.exception("export transport raised", destination=target.name, kind=target.kind)
        by_path, missing = {}, Outcome(False, f"{target.kind}: {type(exc).__name__}: {exc}")
    for path, ids in export_of.items():
        outcomes.update((export_id, by_path.get(path, missing)) for export_id in ids)
    return outcomes


def _send_deidentified(
    sessions: sessionmaker[Session],
    keys: KeyRing | None,
    target: ExportTarget,
    batch: list[Claimed],
    on_sent: Callable[[int, int | None], None] | None,
) -> dict[int, Outcome]:
    """De-identify, then send (issue 16 part 2): never the original, whatever fails."""
    from dicom_node.security.roundtrip import deidentified_copies, deidentified_copies_sent

    if keys is None:
        reason = "not sent: de-identification needs the node's key (spool_encryption_key_file)"
        return {claimed.id: Outcome(False, reason) for claimed in batch}
    with tempfile.TemporaryDirectory(prefix="dicom-node-deid-") as folder:
        try:
            copies, outcomes, records = deidentified_copies(
                sessions, keys, target, batch, Path(folder)
            )
        except Exception as exc:  # the map could not be written: send nothing
            log.exception("de-identification failed", destination=target.name)
            reason = f"not sent: de-identification failed ({type(exc).__name__})"
            return {claimed.id: Outcome(False, reason) for claimed in batch}
        outcomes.update(_send_batch(target, copies, on_sent))
    by_id = {claimed.id: record for claimed, record in zip(copies, records, strict=True)}
    delivered = [by_id[i].pseudonymous_study_uid for i, o in outcomes.items() if o.delivered]
    if delivered:
        deidentified_copies_sent(target.name, delivered)
    return outcomes


def _send_checkpointed(
    sessions: sessionmaker[Session],
    target: ExportTarget,
    batch: list[Claimed],
    on_sent: Callable[[int, int | None], None] | None,
    keys: KeyRing | None,
    policy: RetryPolicy,
    rng: random.Random | None,
    report: DeliveryReport,
) -> dict[int, Outcome]:
    """``_send_batch``, recording the delivered rows as they are acknowledged, then the rest."""
    by_id = {claimed.id: claimed for claimed in batch}

    def write(ids: list[int]) -> None:
        delivered = dict.fromkeys(ids, Outcome(True))
        record(sessions, target, [by_id[i] for i in ids], delivered, policy, rng, report)

    with DeliveredCheckpoint(write) as checkpoint:

        def sent(export_id: int, status: int | None) -> None:
            checkpoint.acknowledged(export_id, status)
            if on_sent is not None:
                on_sent(export_id, status)

        outcomes = _send_batch(target, batch, sent, keys)
    rest = [claimed for claimed in batch if claimed.id not in checkpoint.recorded]
    record(sessions, target, rest, outcomes, policy, rng, report)
    return outcomes


def deliver_due(
    sessions: sessionmaker[Session],
    targets: Iterable[ExportTarget],
    now: dt.datetime | None = None,
    *,
    policy: RetryPolicy | None = None,
    limit: int = 500,
    rng: random.Random | None = None,
    on_sent: Callable[[int, int | None], None] | None = None,
    node: str | None = None,
    keys: KeyRing | None = None,
) -> DeliveryReport:
    """Send every due export of the given destinations once; record what became of each.

    Rows of a destination not in ``targets`` stay pending (it may be configured again).
    ``on_sent(export_id, status)`` is called after each C-STORE (``status`` ``None`` when
    there was no response). ``keys`` decrypt the files the node encrypted
    (``dicom_node.security.crypto``) and seal the pseudonym map of de-identifying
    destinations.
    """
    now = now or utcnow()
    policy = policy or RetryPolicy()
    by_name: dict[str, ExportTarget] = {}
    for target in targets:
        if target.name in by_name and by_name[target.name] != target:
            raise ValueError(f"two export destinations are named {target.name!r}")
        by_name[target.name] = target
    report = DeliveryReport()
    if not by_name:
        return report
    claimed = claim(sessions, sorted(by_name), now, limit, node)
    report.claimed = len(claimed)
    batches: dict[str, list[Claimed]] = {}
    for item in claimed:
        batches.setdefault(item.destination, []).append(item)
    for name, batch in batches.items():
        target = by_name[name]
        if target.deidentify is not None:
            # Recorded after the batch: a delivered row's pseudonymised study must be
            # recorded as sent in the same round (``deidentified_copies_sent``).
            outcomes = _send_deidentified(sessions, keys, target, batch, on_sent)
            record(sessions, target, batch, outcomes, policy, rng, report)
        else:
            outcomes = _send_checkpointed(
                sessions, target, batch, on_sent, keys, policy, rng, report
            )
        log.info(
            "export batch sent",
            destination=name,
            instances=len(batch),
            delivered=sum(1 for o in outcomes.values() if o.delivered),
        )
    return report


class Exporter:
    """Runs ``deliver_due`` every ``interval`` seconds on a daemon thread until ``stop``."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        targets: Iterable[ExportTarget],
        *,
        interval: float = 1.0,
        policy: RetryPolicy | None = None,
        limit: int = 500,
        node: str | None = None,
        keys: KeyRing | None = None,
        metrics: NodeMetrics | None = None,
        commitments: PendingTransactions | None = None,
        probe: ReachabilityProbe | None = None,
    ) -> None:
        """``commitments``: where the transactions asked of storage commitment destinations
        are marked for the receivers (``<data_dir>/commitment``); None: never asked."""
        self.sessions = sessions
        self.commitments = commitments
        self.probe = probe or ReachabilityProbe()
        self.metrics = metrics or NodeMetrics()
        self.keys = keys
        self.node = node
        self.keys = keys
        self.targets = tuple(targets)
        self.interval = interval
        self.policy = policy or RetryPolicy()
        self.limit = limit
        self.rounds = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Recover rows a crash left ``sending``, then start delivering."""
        if self._thread is not None:
            raise RuntimeError("the exporter is already running")
        recover_interrupted(self.sessions, node=self.node)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="exporter", daemon=True)
        self._thread.start()

    def set_targets(self, targets: Iterable[ExportTarget]) -> None:
        """Deliver to these destinations from the next round on (routing was edited)."""
        self.targets = tuple(targets)

    def wake(self) -> None:
        """Deliver now rather than at the next interval (after an ``enqueue``)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the batch in flight (sends are bounded by the targets' timeouts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _release_returned(self) -> None:
        """Rows of a destination that is back after an outage are due now, not after
        their backoff (``dicom_node.export.probe``)."""
        for name in self.probe.back(self.targets):
            log.info("destination reachable again", destination=name)
            if due_now(self.sessions, name):
                self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = deliver_due(
                    self.sessions,
                    self.targets,
                    policy=self.policy,
                    limit=self.limit,
                    node=self.node,
                    keys=self.keys,
                )
                self.metrics.exports_recorded(report)
                if self.commitments is not None:
                    request_due(self.sessions, self.targets, self.commitments)
                self.probe.observe(report)
                self._release_returned()
            except Exception:  # a database hiccup must not end the exporter
                log.exception("export round failed")
            self.rounds += 1
            self._wake.wait(self.interval)
            self._wake.clear()
