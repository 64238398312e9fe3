"""The database index of the spool, written in batches off the association threads.

The C-STORE handler only puts a record on a queue after the file is durable; one
indexer thread turns the queue into batched transactions. A crash can lose queued
records but never files: ``reconcile`` re-indexes any spooled file the database lacks.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    Association,
    AssociationStatus,
    Base,
    Instance,
    Series,
    Study,
    StudyEvent,
    StudyEventKind,
    StudyStatus,
    as_utc,
)
from db.upsert import insert_for
from dicom_node.records import (
    AssociationClosed,
    AssociationOpened,
    CommitmentReported,
    IndexRecord,
    InstanceStored,
    clip_text,
)
from dicom_node.security import audit
from dicom_node.security.crypto import plaintext_size
from dicom_node.security.keys import KeyRing
from dicom_node.storage import InstanceKey, Spool, is_valid_uid, read_index_fields

log = structlog.get_logger(__name__)

Row = TypeVar("Row", bound=Base)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


def write_batch(session: Session, records: Sequence[IndexRecord]) -> list[Path]:
    """Apply records in order inside the caller's transaction.

    Returns spool files made obsolete (an instance re-sent under another study or
    series); the caller deletes them once the transaction has committed. Studies, series
    and instances are inserted with ``ON CONFLICT DO NOTHING``: another node indexing the
    same study at the same time is not an error.
    """
    stored = [record for record in records if isinstance(record, InstanceStored)]
    studies = _insert_missing(
        session,
        Study,
        Study.study_instance_uid,
        {r.key.study_instance_uid: _study_row(r) for r in reversed(stored)},
    )
    series_rows = _insert_missing(
        session,
        Series,
        Series.series_instance_uid,
        {
            r.key.series_instance_uid: _series_row(studies[r.key.study_instance_uid], r)
            for r in reversed(stored)
        },
    )
    instances = _load_by_uid(
        session, Instance, Instance.sop_instance_uid, {r.key.sop_instance_uid for r in stored}
    )
    obsolete: list[Path] = []
    new_instances: dict[str, dict[str, object]] = {}
    for record in records:
        if isinstance(record, AssociationOpened):
            session.add(
                Association(
                    id=record.association_id,
                    calling_ae_title=record.calling_ae_title,
                    called_ae_title=record.called_ae_title,
                    peer_address=record.peer_address,
                    peer_port=record.peer_port,
                    accepted=record.accepted,
                    reject_reason=record.reject_reason,
                    status=(
                        AssociationStatus.OPEN if record.accepted else AssociationStatus.REJECTED
                    ),
                    started_at=record.started_at,
                    ended_at=None if record.accepted else record.started_at,
                    instances_received=0,
                    instances_failed=0,
                    bytes_received=0,
                )
            )
            session.flush()
            _audit_association(session, record)
        elif isinstance(record, AssociationClosed):
            association = session.get(Association, record.association_id)
            if association is None:
                continue
            association.status = record.status
            association.ended_at = record.ended_at
            association.instances_received = record.instances_received
            association.instances_failed = record.instances_failed
            association.bytes_received = record.bytes_received
        elif isinstance(record, CommitmentReported):
            # Here, not at the top: the export package's metrics import this module.
            from dicom_node.export.commitment import apply_report

            apply_report(session, record)
        else:
            study = studies[record.key.study_instance_uid]
            _receive_into(session, study, record)
            series = _place_series(series_rows[record.key.series_instance_uid], study)
            if record.key.sop_instance_uid in instances:
                old_path = _update_instance(instances[record.key.sop_instance_uid], series, record)
                if old_path is not None:
                    obsolete.append(old_path)
            else:
                new_instances[record.key.sop_instance_uid] = _instance_row(series, record)
    if new_instances:
        obsolete += _insert_instances(session, new_instances, series_rows, stored)
    _audit_stored(session, stored)
    return obsolete


def _audit_association(session: Session, record: AssociationOpened) -> None:
    actor = audit.Actor.dicom_peer(record.calling_ae_title, record.peer_address, record.peer_port)
    audit.record(
        session,
        action=(
            audit.AuditAction.ASSOCIATION_ACCEPTED
            if record.accepted
            else audit.AuditAction.ASSOCIATION_REFUSED
        ),
        actor=actor,
        outcome=audit.AuditOutcome.SUCCESS if record.accepted else audit.AuditOutcome.FAILURE,
        reason=record.reject_reason,
        object_kind=audit.AuditObjectKind.ASSOCIATION,
        object_id=record.association_id,
        details={"called_ae_title": record.called_ae_title},
        at=record.started_at,
    )


def _audit_stored(session: Session, stored: Sequence[InstanceStored]) -> None:
    """One row per association and series of the batch, with the count: a row per
    instance would cost ingest speed for no more information (the instances table has them)."""
    groups: dict[tuple[str | None, str, str], list[InstanceStored]] = {}
    for record in stored:
        key = (record.association_id, record.key.study_instance_uid, record.key.series_instance_uid)
        groups.setdefault(key, []).append(record)
    for (association_id, study_uid, series_uid), records in groups.items():
        association = session.get(Association, association_id) if association_id else None
        actor = (
            audit.Actor.dicom_peer(
                association.calling_ae_title, association.peer_address, association.peer_port
            )
            if association is not None
            else audit.Actor.node("indexer")  # re-indexed from the spool at start
        )
        audit.record(
            session,
            action=audit.AuditAction.INSTANCES_STORED,
            actor=actor,
            object_kind=audit.AuditObjectKind.ASSOCIATION if association_id else None,
            object_id=association_id,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=records[0].key.sop_instance_uid if len(records) == 1 else None,
            count=len(records),
            details={"bytes": sum(record.size_bytes for record in records)},
            at=max(record.received_at for record in records),
        )


def _insert_missing(
    session: Session, model: type[Row], column: Any, rows: dict[str, dict[str, object]]
) -> dict[str, Row]:
    """Insert the rows (by unique ``column`` value) the table lacks; return all of them.

    Looked up first: a study or series arrives over many batches, and an insert that
    conflicts costs a statement (and, on PostgreSQL, a value of the id sequence)."""
    found = _load_by_uid(session, model, column, set(rows))
    missing = [row for uid, row in rows.items() if uid not in found]
    if missing:
        session.execute(
            insert_for(session, model).on_conflict_do_nothing(index_elements=[column.key]),
            missing,
        )
        found |= _load_by_uid(session, model, column, set(rows) - set(found))
    return found


def _insert_instances(
    session: Session,
    rows: dict[str, dict[str, object]],
    series_rows: dict[str, Series],
    stored: Sequence[InstanceStored],
) -> list[Path]:
    """Insert new instances in one statement (the indexer's main cost). One that another
    node indexed meanwhile is updated like a re-sent instance; returns obsolete files."""
    inserted = set(
        session.scalars(
            insert_for(session, Instance)
            .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid.key])
            .returning(Instance.sop_instance_uid),
            list(rows.values()),
        )
    )
    raced = set(rows) - inserted
    if not raced:
        return []
    latest = {r.key.sop_instance_uid: r for r in stored if r.key.sop_instance_uid in raced}
    obsolete = []
    for uid, instance in _load_by_uid(session, Instance, Instance.sop_instance_uid, raced).items():
        record = latest[uid]
        series = series_rows[record.key.series_instance_uid]
        old_path = _update_instance(instance, series, record)
        if old_path is not None:
            obsolete.append(old_path)
    return obsolete


def _load_by_uid(session: Session, model: type[Row], column: Any, uids: set[str]) -> dict[str, Row]:
    if not uids:
        return {}
    rows = session.scalars(select(model).where(column.in_(sorted(uids))))
    return {getattr(row, column.key): row for row in rows}


def _study_row(record: InstanceStored) -> dict[str, object]:
    return {
        "study_instance_uid": record.key.study_instance_uid,
        "status": StudyStatus.RECEIVING,
        "study_date": clip_text(record.study_date, 8),
        "first_received_at": record.received_at,
        "last_received_at": record.received_at,
    }


def _series_row(study: Study, record: InstanceStored) -> dict[str, object]:
    return {
        "series_instance_uid": record.key.series_instance_uid,
        "study_id": study.id,
        "modality": clip_text(record.modality, 16),
        "series_number": record.series_number,
        "series_description": clip_text(record.series_description, 64),
        "body_part_examined": clip_text(record.body_part_examined, 16),
    }


def _receive_into(session: Session, study: Study, record: InstanceStored) -> None:
    """A new instance for ``study``: it was received later, and reopens it if complete."""
    if as_utc(study.last_received_at) < record.received_at:
        study.last_received_at = record.received_at
    if study.purged_at is not None:  # received again after retention deleted its files
        study.purged_at = None
    if study.status == StudyStatus.COMPLETE:
        study.status = StudyStatus.RECEIVING
        study.completed_at = None
        session.add(
            StudyEvent(
                study_id=study.id,
                event=StudyEventKind.REOPENED,
                at=record.received_at,
                num_instances=0,
            )
        )
        log.info("study reopened", study_id=study.id)


def _place_series(series: Series, study: Study) -> Series:
    if series.study_id != study.id:
        log.warning("series moved to another study", series_id=series.id, study_id=study.id)
        series.study_id = study.id
    return series


def _instance_row(series: Series, record: InstanceStored) -> dict[str, object]:
    return {
        "sop_instance_uid": record.key.sop_instance_uid,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "series_id": series.id,
        "instance_number": record.instance_number,
        "path": str(record.path),
        "size_bytes": record.size_bytes,
        "received_at": record.received_at,
        "association_id": record.association_id,
        "purged_at": None,
    }


def _update_instance(instance: Instance, series: Series, record: InstanceStored) -> Path | None:
    """Point an indexed instance at its new copy; return the old file if it moved."""
    old_path = Path(instance.path)
    for column, value in _instance_row(series, record).items():
        setattr(instance, column, value)
    return old_path if old_path != record.path else None


class Indexer:
    """One thread that drains the record queue into batched transactions."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        batch_size: int = 256,
        flush_seconds: float = 0.05,
        idle_callback: Callable[[], None] | None = None,
        idle_interval: float = 1.0,
        on_record: Callable[[IndexRecord], None] | None = None,
    ) -> None:
        """``on_record``: told of each record as it arrives (the node's metrics)."""
        self._sessions = sessions
        self._on_record = on_record
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._idle_callback = idle_callback
        self._idle_interval = idle_interval
        self._queue: queue.Queue[IndexRecord | _Flush | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._next_idle = 0.0

    def start(self) -> None:
        self._thread.start()

    def put(self, record: IndexRecord) -> None:
        self._queue.put(record)
        if self._on_record is not None:
            self._on_record(record)

    @property
    def backlog(self) -> int:
        """Records (and markers) waiting to be written."""
        return self._queue.qsize()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until everything queued before this call is committed."""
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            timeout = max(0.0, self._next_idle - time.monotonic())
            try:
                first = self._queue.get(timeout=timeout if self._idle_callback else None)
            except queue.Empty:
                self._run_idle()
                continue
            batch: list[IndexRecord] = []
            markers: list[_Flush] = []
            stop = False
            item: IndexRecord | _Flush | None = first
            deadline = time.monotonic() + self._flush_seconds
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                else:
                    batch.append(item)
                if stop or len(batch) >= self._batch_size or markers:
                    break
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)
            for marker in markers:
                marker.done.set()
            if time.monotonic() >= self._next_idle:
                self._run_idle()
            if stop:
                return

    def _run_idle(self) -> None:
        self._next_idle = time.monotonic() + self._idle_interval
        if self._idle_callback is None:
            return
        try:
            self._idle_callback()
        except Exception:
            log.exception("periodic task failed")

    def _commit(self, batch: list[IndexRecord]) -> None:
        for attempt in range(1, 6):
            try:
                with self._sessions.begin() as session:
                    obsolete = write_batch(session, batch)
            except (IntegrityError, OperationalError) as exc:
                # The database was busy (inserts of a key another node made meanwhile
                # do not get here: they are ON CONFLICT DO NOTHING).
                log.warning("index batch retried", attempt=attempt, error=type(exc).__name__)
                threading.Event().wait(0.05 * attempt)
                continue
            except Exception:
                log.exception("index batch failed; files stay in the spool", size=len(batch))
                return
            for path in obsolete:
                path.unlink(missing_ok=True)
                log.info("replaced instance moved; old file removed")
            return
        log.error("index batch gave up; reconcile on restart will index it", size=len(batch))


def stored_record_from_file(
    path: Path,
    received_at: dt.datetime | None = None,
    association_id: str | None = None,
    keys: KeyRing | None = None,
) -> InstanceStored:
    fields = read_index_fields(path, keys)
    key = InstanceKey.checked(
        fields["StudyInstanceUID"], fields["SeriesInstanceUID"], fields["SOPInstanceUID"]
    )
    sop_class = fields["SOPClassUID"]
    if not is_valid_uid(sop_class):
        raise ValueError("SOPClassUID is not a valid UID")
    return InstanceStored.from_fields(
        key,
        fields,
        sop_class_uid=str(sop_class),
        transfer_syntax_uid=str(fields["TransferSyntaxUID"]),
        path=path,
        size_bytes=plaintext_size(path),
        received_at=received_at or dt.datetime.fromtimestamp(path.stat().st_mtime, tz=dt.UTC),
        association_id=association_id,
    )


def reconcile(
    spool: Spool,
    sessions: sessionmaker[Session],
    batch_size: int = 500,
    *,
    started_at: float | None = None,
) -> int:
    """Index every spooled file the database does not know. Returns how many were added.

    Receivers may be storing already (``started_at``: when the node started): a file they
    file meanwhile may be indexed here and by the indexer, which is harmless, and their
    temp files are left alone.
    """
    removed = spool.remove_stale_temp_files(older_than=started_at)
    if removed:
        log.info("removed interrupted writes", count=removed)
    with sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path))
        indexed = {str(uid): str(path) for uid, path in rows}
    known_paths = set(indexed.values())
    missing = [path for path in spool.iter_files() if str(path) not in known_paths]
    added = 0
    for start in range(0, len(missing), batch_size):
        records = [
            record
            for record in _records_for(missing[start : start + batch_size], spool.keys)
            if _newer_than_indexed(record, indexed)
        ]
        with sessions.begin() as session:
            for old in write_batch(session, records):
                old.unlink(missing_ok=True)
        added += len(records)
    if missing:
        log.info("re-indexed spooled files", count=added)
    return added


def _newer_than_indexed(record: InstanceStored, indexed: dict[str, str]) -> bool:
    """A file re-sent under another study/series: the newer copy wins, as on the wire."""
    other = indexed.get(record.key.sop_instance_uid)
    if other is None or not Path(other).exists():
        return True
    if Path(other).stat().st_mtime <= record.received_at.timestamp():
        return True
    log.warning("older duplicate of an indexed instance left unindexed", path=str(record.path))
    return False


def _records_for(paths: Iterable[Path], keys: KeyRing | None) -> list[InstanceStored]:
    records: list[InstanceStored] = []
    for path in paths:
        try:
            records.append(stored_record_from_file(path, keys=keys))
        except Exception as exc:
            log.error("spooled file cannot be indexed", path=str(path), error=str(exc))
    return records
