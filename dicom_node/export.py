"""Export: send instances to destinations (C-STORE SCU) with retries, persisted.

``enqueue`` writes one ``exports`` row per (destination, SOP instance); enqueueing the
same instance again is the same row. ``deliver_due`` claims the rows whose time has come
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several nodes can share the work), marks
them ``sending``, sends each destination's batch over one association with the existing
SCU (``dicom_node.scu.send``), and records the outcome per instance:

- success (0x0000, the SCU's warnings) or a *duplicate* answer -> ``delivered``; output
  UIDs are deterministic, so a re-send is harmless and a PACS that says "already have
  it" has it;
- any other failure -> the attempt is counted and the error text kept; the next attempt
  comes after an exponential backoff (``RetryPolicy``: 2 s, 4 s, 8 s ... at most 10 min,
  with jitter), or the row is ``failed`` once it has used ``max_attempts``.

A failure status for one instance costs only that instance an attempt; a destination
that cannot be reached costs every instance of the batch one. ``Exporter`` runs
``deliver_due`` on a thread; on start it puts rows left ``sending`` by a crash back to
``pending``, so a restart resumes what was under way (at-least-once delivery).

A destination with a ``url`` is a DICOMweb server: its batch goes by STOW-RS
(``dicomweb-client``) in requests of ``STOW_BATCH`` instances, and the server's
FailedSOPSequence says which instances failed.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Output
from dicom_node.config import Destination
from dicom_node.scu import AssociationFailedError, SendFile, scan_files, send

log = structlog.get_logger(__name__)

DUPLICATE_SOP_INSTANCE = 0x0111
"""PS3.7 C.5: "Duplicate SOP Instance"; the PACS has the instance, so it is delivered."""
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
"""Success and the C-STORE warnings (coercion, elements discarded): the PACS stored it."""


class ExportError(ValueError):
    """A file or output cannot be enqueued (not DICOM, no SOP UIDs)."""


MIN_FILES_PER_ASSOCIATION = 8
"""A batch is split over parallel associations only in parts of at least this many."""


@dataclass(frozen=True)
class ExportTarget:
    """Where to send: a destination by name, as the configuration describes it."""

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae_title: str = "DICOMNODE"
    max_attempts: int = 10
    timeout: float = 60.0
    url: str | None = None
    associations: int = 4

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an export destination needs a name")
        if self.url is None and not 0 < self.port < 65536:
            raise ValueError(f"destination {self.name!r}: port {self.port} out of range")
        if self.max_attempts < 1:
            raise ValueError(f"destination {self.name!r}: max_attempts must be at least 1")
        if self.timeout <= 0:
            raise ValueError(f"destination {self.name!r}: timeout must be positive")
        if self.associations < 1:
            raise ValueError(f"destination {self.name!r}: associations must be at least 1")


def export_target(destination: Destination, node_ae_title: str) -> ExportTarget:
    """The target for a configured destination; the node's AE title calls it by default."""
    return ExportTarget(
        name=destination.name,
        host=destination.host or (destination.url or ""),
        port=destination.port,
        ae_title=destination.ae_title,
        calling_ae_title=destination.calling_ae_title or node_ae_title,
        max_attempts=destination.max_attempts,
        timeout=destination.timeout,
        url=destination.url,
        associations=destination.associations,
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff after the n-th failed attempt: ``min(cap, base * 2**(n-1))``, jittered down
    by up to ``jitter`` of itself (so nodes that failed together do not retry together)."""

    base_seconds: float = 2.0
    cap_seconds: float = 600.0
    jitter: float = 0.5

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        exponent = min(max(attempts - 1, 0), 64)
        full = min(self.cap_seconds, self.base_seconds * 2.0**exponent)
        factor = 1.0 - self.jitter * (rng or random).random()
        return full * factor


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` call did, by export id."""

    claimed: int = 0
    delivered: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Claimed:
    id: int
    destination: str
    path: str
    attempts: int
    max_attempts: int


@dataclass(frozen=True)
class _Outcome:
    delivered: bool
    error: str | None = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _instance_uids(path: Path) -> tuple[str, str]:
    try:
        header = dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ExportError(f"{path}: not readable as DICOM: {exc}") from exc
    sop_class, sop_instance = header.get("SOPClassUID"), header.get("SOPInstanceUID")
    if not sop_class or not sop_instance:
        raise ExportError(f"{path}: not a DICOM instance (no SOP Class/Instance UID)")
    return str(sop_class), str(sop_instance)


def enqueue(
    session: Session,
    target: ExportTarget,
    files_or_outputs: Iterable[Path | Output],
    *,
    now: dt.datetime | None = None,
) -> list[Export]:
    """Add (or find) one row per instance for ``target``, due now, in the caller's transaction.

    A row already ``pending``, ``sending`` or ``delivered`` is left as it is (an instance
    exported twice is sent once); a ``failed`` one goes back to ``pending`` with its
    attempts kept, like ``retry``. Raises ``ExportError`` for a file that is not DICOM.
    """
    now = now or utcnow()
    rows: list[Export] = []
    for item in files_or_outputs:
        if isinstance(item, Output):
            sop_class, sop_instance, path, output_id = (
                item.sop_class_uid,
                item.sop_instance_uid,
                item.path,
                item.id,
            )
        else:
            sop_class, sop_instance = _instance_uids(item)
            path, output_id = str(item.resolve()), None
        row = session.scalars(
            select(Export).where(
                Export.destination == target.name, Export.sop_instance_uid == sop_instance
            )
        ).one_or_none()
        if row is None:
            row = Export(
                destination=target.name,
                host=target.host[:255],
                port=target.port,
                ae_title=target.ae_title,
                sop_instance_uid=sop_instance,
                sop_class_uid=sop_class,
                path=path,
                state=ExportState.PENDING.value,
                attempts=0,
                max_attempts=target.max_attempts,
                next_attempt_at=now,
                created_at=now,
                output_id=output_id,
            )
            session.add(row)
            session.flush()
        elif row.state == ExportState.FAILED.value:
            row.path, row.sop_class_uid = path, sop_class
            row.output_id = output_id if output_id is not None else row.output_id
            _to_pending(row, now)
        rows.append(row)
    return rows


def _to_pending(row: Export, now: dt.datetime) -> None:
    row.state = ExportState.PENDING.value
    row.next_attempt_at = now
    row.last_error = None


def retry(session: Session, export_id: int, *, now: dt.datetime | None = None) -> Export | None:
    """Put one export back to ``pending``, due now, attempts kept (so a failed row gets one
    more attempt). ``None`` if there is no such export; a delivered one is sent again."""
    row = session.get(Export, export_id)
    if row is None:
        return None
    _to_pending(row, now or utcnow())
    return row


def recover_interrupted(
    sessions: sessionmaker[Session], now: dt.datetime | None = None, node: str | None = None
) -> int:
    """Rows left ``sending`` (the node died mid-send) go back to ``pending``, due now.

    With ``node``, only the rows that node claimed (and rows nobody claimed): other nodes
    sharing the database may be sending theirs right now.
    """
    query = update(Export).where(Export.state == ExportState.SENDING.value)
    if node is not None:
        query = query.where(or_(Export.claimed_by == node, Export.claimed_by.is_(None)))
    with sessions() as session, session.begin():
        changed = session.execute(
            query.values(
                state=ExportState.PENDING.value, next_attempt_at=now or utcnow(), claimed_by=None
            )
        ).rowcount  # type: ignore[attr-defined]
    if changed:
        log.info("interrupted exports back to pending", count=changed)
    return int(changed)


def _claim(
    sessions: sessionmaker[Session],
    names: Sequence[str],
    now: dt.datetime,
    limit: int,
    node: str | None,
) -> list[_Claimed]:
    with sessions() as session, session.begin():
        query = (
            select(Export)
            .where(
                Export.state == ExportState.PENDING.value,
                Export.next_attempt_at <= now,
                Export.destination.in_(names),
            )
            .order_by(Export.next_attempt_at, Export.id)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        claimed = []
        for row in session.scalars(query).all():
            changed = session.execute(
                update(Export)
                .where(Export.id == row.id, Export.state == ExportState.PENDING.value)
                .values(state=ExportState.SENDING.value, claimed_by=node)
            ).rowcount  # type: ignore[attr-defined]
            if changed:
                claimed.append(
                    _Claimed(row.id, row.destination, row.path, row.attempts, row.max_attempts)
                )
        return claimed


def _outcome(status: int | None, failure: str | None, sent: bool, error: str) -> _Outcome:
    """Delivered on success, a warning, or a duplicate answer (by status or comment)."""
    if status is not None and (status in SUCCESS_STATUSES or status == DUPLICATE_SOP_INSTANCE):
        return _Outcome(True)
    if failure is not None:
        return _Outcome("duplicate" in failure.lower(), failure)
    if status is not None:
        return _Outcome(False, f"status 0x{status:04X}")
    # Never answered: the association failed before this instance (or could not be made).
    return _Outcome(False, error if not sent else "no response")


def _send_batch(
    target: ExportTarget,
    batch: list[_Claimed],
    on_sent: Callable[[int, int | None], None] | None,
) -> dict[int, _Outcome]:
    outcomes: dict[int, _Outcome] = {}
    files: list[SendFile] = []
    export_of: dict[Path, list[int]] = {}
    for claimed in batch:
        try:
            found, skipped = scan_files([Path(claimed.path)])
        except FileNotFoundError:
            outcomes[claimed.id] = _Outcome(False, f"file missing: {claimed.path}")
            continue
        if not found:
            reason = skipped[0][1] if skipped else "not a DICOM file"
            outcomes[claimed.id] = _Outcome(False, f"{claimed.path}: {reason}")
            continue
        if found[0].path not in export_of:
            files.append(found[0])
        export_of.setdefault(found[0].path, []).append(claimed.id)
    if not files:
        return outcomes

    if target.url is not None:
        return outcomes | _stow_batch(target, files, export_of)

    statuses: dict[Path, int | None] = {}

    def progress(item: SendFile, status: int | None) -> None:
        statuses[item.path] = status
        if on_sent is not None:
            for export_id in export_of[item.path]:
                on_sent(export_id, status)

    def send_part(part: list[SendFile]) -> tuple[dict[Path, str], str | None]:
        try:
            report = send(
                part,
                target.host,
                target.port,
                calling_ae=target.calling_ae_title,
                called_ae=target.ae_title,
                timeout=target.timeout,
                on_progress=progress,
            )
        except AssociationFailedError as exc:
            return {}, str(exc)
        except Exception as exc:  # a broken peer must not kill the exporter
            return {}, f"{type(exc).__name__}: {exc}"
        return dict(report.failed), None

    # Several associations at once: a PACS that fsyncs each instance (Orthanc) stores
    # several times faster over parallel associations (docs/benchmarks.md).
    count = max(1, min(target.associations, len(files) // MIN_FILES_PER_ASSOCIATION))
    parts = [files[start::count] for start in range(count)]
    failures: dict[Path, str] = {}
    errors: dict[Path, str] = {}
    with ThreadPoolExecutor(count, thread_name_prefix="export") as pool:
        for part, (failed, error) in zip(parts, pool.map(send_part, parts), strict=True):
            failures.update(failed)
            errors.update((item.path, error or "not sent") for item in part)
    for path, ids in export_of.items():
        outcome = _outcome(statuses.get(path), failures.get(path), path in statuses, errors[path])
        for export_id in ids:
            outcomes[export_id] = outcome
    return outcomes


STOW_BATCH = 32
_FAILED_SOP_SEQUENCE = 0x00081198
_FAILURE_REASON = 0x00081197
_REFERENCED_SOP_INSTANCE_UID = 0x00081155


def _stow_failures(response: object) -> dict[str, str]:
    """SOP Instance UID -> reason, from a STOW-RS response's FailedSOPSequence."""
    failures: dict[str, str] = {}
    items = getattr(response, "get", lambda _tag: None)(_FAILED_SOP_SEQUENCE)
    for item in getattr(items, "value", None) or []:
        uid = item.get(_REFERENCED_SOP_INSTANCE_UID)
        reason = item.get(_FAILURE_REASON)
        if uid is not None:
            code = f"0x{int(reason.value):04X}" if reason is not None else "unknown"
            failures[str(uid.value)] = f"STOW-RS failure reason {code}"
    return failures


def _stow_batch(
    target: ExportTarget, files: list[SendFile], export_of: dict[Path, list[int]]
) -> dict[int, _Outcome]:
    from dicomweb_client.api import DICOMwebClient

    assert target.url is not None
    client = DICOMwebClient(url=target.url, timeout=target.timeout)
    client.set_http_retry_params(retry=False)  # the export queue does the retrying
    outcomes: dict[int, _Outcome] = {}
    for start in range(0, len(files), STOW_BATCH):
        chunk = files[start : start + STOW_BATCH]
        try:
            datasets = [dcmread(item.path) for item in chunk]
            failures = _stow_failures(client.store_instances(datasets=datasets))
            errors = {
                item.path: failures.get(str(ds.SOPInstanceUID))
                for item, ds in zip(chunk, datasets, strict=True)
            }
        except Exception as exc:  # HTTP errors, refused connections, unreadable files
            message = f"STOW-RS to {target.url}: {type(exc).__name__}: {exc}"
            errors = {item.path: message for item in chunk}
        for path, error in errors.items():
            for export_id in export_of[path]:
                outcomes[export_id] = _Outcome(error is None, error)
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
) -> DeliveryReport:
    """Send every due export of the given destinations once; record what became of each.

    Rows of a destination not in ``targets`` stay pending (it may be configured again).
    ``on_sent(export_id, status)`` is called after each C-STORE (``status`` ``None`` when
    there was no response).
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
    claimed = _claim(sessions, sorted(by_name), now, limit, node)
    report.claimed = len(claimed)
    batches: dict[str, list[_Claimed]] = {}
    for item in claimed:
        batches.setdefault(item.destination, []).append(item)
    for name, batch in batches.items():
        target = by_name[name]
        outcomes = _send_batch(target, batch, on_sent)
        _record(sessions, target, batch, outcomes, policy, rng, report)
        log.info(
            "export batch sent",
            destination=name,
            instances=len(batch),
            delivered=sum(1 for o in outcomes.values() if o.delivered),
        )
    return report


def _record(
    sessions: sessionmaker[Session],
    target: ExportTarget,
    batch: list[_Claimed],
    outcomes: dict[int, _Outcome],
    policy: RetryPolicy,
    rng: random.Random | None,
    report: DeliveryReport,
) -> None:
    finished = utcnow()
    with sessions() as session, session.begin():
        for claimed in batch:
            outcome = outcomes[claimed.id]
            attempts = claimed.attempts + 1
            values: dict[str, object] = {
                "attempts": attempts,
                "claimed_by": None,
                "host": target.host[:255],
                "port": target.port,
                "ae_title": target.ae_title,
            }
            if outcome.delivered:
                values.update(
                    state=ExportState.DELIVERED.value, delivered_at=finished, last_error=None
                )
                report.delivered.append(claimed.id)
            else:
                error = (outcome.error or "unknown error")[:2000]
                values["last_error"] = error
                report.errors[claimed.id] = error
                if attempts >= claimed.max_attempts:
                    values["state"] = ExportState.FAILED.value
                    report.failed.append(claimed.id)
                    log.warning(
                        "export failed for good",
                        export_id=claimed.id,
                        destination=target.name,
                        attempts=attempts,
                        error=error,
                    )
                else:
                    delay = policy.delay(attempts, rng)
                    values["state"] = ExportState.PENDING.value
                    values["next_attempt_at"] = finished + dt.timedelta(seconds=delay)
                    report.retrying.append(claimed.id)
            session.execute(
                update(Export)
                .where(Export.id == claimed.id, Export.state == ExportState.SENDING.value)
                .values(**values)
            )


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
    ) -> None:
        self.sessions = sessions
        self.node = node
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

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deliver_due(
                    self.sessions,
                    self.targets,
                    policy=self.policy,
                    limit=self.limit,
                    node=self.node,
                )
            except Exception:  # a database hiccup must not end the exporter
                log.exception("export round failed")
            self.rounds += 1
            self._wake.wait(self.interval)
            self._wake.clear()
