"""Retention: received studies and job outputs deleted by rule, never before delivery.

What may go:

- a **study**'s spool files, once it is *done*: complete (no complete event left to route),
  none of its jobs queued, running or failed (a failed job is a dead letter: ``replay``
  runs it again from the spool), and every export of its outputs and of its own instances
  (de-identified copies) delivered, or committed for a destination that asks for storage
  commitment (``delivery_proven``). It goes ``retention_spool_hours`` after the last of
  these happened;
- a **job's outputs** (``<data_dir>/outputs/job-N``), once the job has finished (not
  queued or running) and every export of its outputs is proven delivered, after
  ``retention_outputs_hours``;
- and below the disk watermark (``retention_free_bytes`` / ``retention_free_percent``
  free on the data folder's file system), the oldest done studies and outputs first,
  whatever their age, until the free space is back above it.

A cancelled job or export counts as finished: an operator gave it up. The rows stay
(studies, series, instances, outputs, exports and the audit trail keep their UIDs), with
``purged_at`` set; an instance of a purged study received again is stored and indexed
again (``dicom_node.index`` clears the marks). Each purge is one ``data_purged`` audit row
with the UIDs, the count and the bytes.

Several nodes on one database: each purge is claimed by a conditional UPDATE (still not
purged, the study still complete and received last when it was chosen), committed before
a file is deleted, so two nodes never both purge one study. A file is deleted only if it
was not written after the row that named it: an instance sent again (and acknowledged)
while its study was being purged keeps its new file.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from sqlalchemy import ColumnElement, and_, func, not_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    Study,
    StudyEvent,
    StudyEventKind,
    StudyStatus,
    as_utc,
    utcnow,
)
from dicom_node.config import ConfigError, Destination, Settings
from dicom_node.disk_space import free_bytes, total_bytes
from dicom_node.routing_store import load_routing
from dicom_node.security import audit

log = structlog.get_logger(__name__)

KEPT_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)
"""A study with a job in one of these states keeps its files."""
UNFINISHED_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
"""A job in one of these states keeps its outputs."""
WRITTEN_AFTER_TOLERANCE = dt.timedelta(seconds=1)
"""A spool file written this long after its row's ``received_at`` is a newer copy."""
WATERMARK_CHECK_SECONDS = 30.0
"""How often the node's retention thread looks at the free space between passes."""

Reason = Literal["age", "disk"]

DELIVERY_PROVEN_AT = func.coalesce(Export.committed_at, Export.delivered_at)
"""When the PACS committed an export, or took it where no commitment is asked."""


# -- when is it done -------------------------------------------------------------------------


def commitment_destinations(destinations: Iterable[Destination]) -> list[str]:
    """The destinations whose deliveries count only once the PACS commits them."""
    return [d.name for d in destinations if d.storage_commitment]


def delivery_proven(commitment: Collection[str]) -> ColumnElement[bool]:
    """An export that no longer needs its file: delivered (committed, for a destination
    in ``commitment``), or cancelled by an operator."""
    delivered: ColumnElement[bool] = Export.state == ExportState.DELIVERED
    if commitment:
        delivered = and_(delivered, Export.destination.not_in(sorted(commitment)))
    committed = Export.state == ExportState.COMMITTED
    return or_(delivered, committed, Export.state == ExportState.CANCELLED)


def _exports_of_study_outputs(study_id: Any) -> Any:
    return (
        select(Export.id)
        .join(Output, Output.id == Export.output_id)
        .join(Job, Job.id == Output.job_id)
        .where(Job.study_id == study_id)
    )


def _exports_of_study_instances(study_id: Any) -> Any:
    return (
        select(Export.id)
        .join(Instance, Instance.sop_instance_uid == Export.sop_instance_uid)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id, Export.output_id.is_(None))
    )


def _last(column: Any, query: Any) -> Any:
    return query.with_only_columns(func.max(column)).scalar_subquery()


def done_studies(session: Session, commitment: Collection[str]) -> list[DoneStudy]:
    """Studies not purged that are done (see the module's docstring), oldest done first."""
    unproven = not_(delivery_proven(commitment))
    rows = session.execute(
        select(
            Study.id,
            Study.study_instance_uid,
            Study.last_received_at,
            Study.completed_at,
            _last(Job.finished_at, select(Job.id).where(Job.study_id == Study.id)),
            _last(DELIVERY_PROVEN_AT, _exports_of_study_outputs(Study.id)),
            _last(DELIVERY_PROVEN_AT, _exports_of_study_instances(Study.id)),
        ).where(
            Study.purged_at.is_(None),
            Study.status == StudyStatus.COMPLETE,
            ~select(StudyEvent.id)
            .where(
                StudyEvent.study_id == Study.id,
                StudyEvent.event == StudyEventKind.COMPLETE,
                StudyEvent.consumed_at.is_(None),
            )
            .exists(),
            ~select(Job.id)
            .where(Job.study_id == Study.id, Job.state.in_(KEPT_JOB_STATES))
            .exists(),
            ~_exports_of_study_outputs(Study.id).where(unproven).exists(),
            ~_exports_of_study_instances(Study.id).where(unproven).exists(),
        )
    ).all()
    found = [
        DoneStudy(study_id, uid, last_received_at, _latest(completed_at, *times))
        for study_id, uid, last_received_at, completed_at, *times in rows
    ]
    return sorted(found, key=lambda study: study.done_at)


def done_job_outputs(session: Session, commitment: Collection[str]) -> list[DoneOutputs]:
    """Finished jobs with outputs not purged whose exports are all proven, oldest first."""
    unproven = not_(delivery_proven(commitment))
    has_unproven_export = (
        select(Export.id)
        .join(Output, Output.id == Export.output_id)
        .where(Output.job_id == Job.id, unproven)
        .exists()
    )
    rows = session.execute(
        select(
            Job.id,
            Job.finished_at,
            Study.study_instance_uid,
            Job.series_instance_uid,
            func.max(Output.created_at),
            _last(
                DELIVERY_PROVEN_AT,
                select(Export.id)
                .join(Output, Output.id == Export.output_id)
                .where(Output.job_id == Job.id),
            ),
        )
        .join(Output, Output.job_id == Job.id)
        .join(Study, Study.id == Job.study_id)
        .where(
            Output.purged_at.is_(None),
            Job.state.not_in(UNFINISHED_JOB_STATES),
            ~has_unproven_export,
        )
        .group_by(Job.id, Job.finished_at, Study.study_instance_uid, Job.series_instance_uid)
    ).all()
    found = [
        DoneOutputs(job_id, study_uid, series_uid, _latest(finished_at, created, delivered))
        for job_id, finished_at, study_uid, series_uid, created, delivered in rows
    ]
    return sorted(found, key=lambda outputs: outputs.done_at)


def _latest(*times: dt.datetime | None) -> dt.datetime:
    known = [as_utc(time) for time in times if time is not None]
    return max(known) if known else dt.datetime.min.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class DoneStudy:
    study_id: int
    study_instance_uid: str
    last_received_at: dt.datetime
    done_at: dt.datetime


@dataclass(frozen=True)
class DoneOutputs:
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    done_at: dt.datetime


# -- what a pass did -------------------------------------------------------------------------


@dataclass
class Purged:
    """One study's spool files or one job's outputs, deleted (or that would be)."""

    kind: Literal["study", "outputs"]
    study_instance_uid: str
    job_id: int | None
    files: int
    bytes: int
    reason: Reason
    done_at: dt.datetime

    @classmethod
    def of(
        cls,
        kind: Literal["study", "outputs"],
        study_instance_uid: str,
        job_id: int | None,
        doomed: Sequence[_Doomed],
        reason: Reason,
        done_at: dt.datetime,
    ) -> Purged:
        size = sum(item.size for item in doomed)
        return cls(kind, study_instance_uid, job_id, len(doomed), size, reason, done_at)


@dataclass
class RetentionReport:
    dry_run: bool
    free_bytes_before: int
    target_free_bytes: int
    free_bytes_after: int = 0
    purged: list[Purged] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.purged)

    def as_dict(self) -> dict[str, Any]:
        found = asdict(self)
        for item in found["purged"]:
            item["done_at"] = item["done_at"].isoformat()
        found["bytes_freed"] = self.bytes_freed
        return found


# -- deleting --------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _Doomed:
    """A file to delete, unless it is written again after ``written_by``."""

    path: Path
    written_by: dt.datetime
    size: int


def _doomed_file(path: Path, written_by: dt.datetime) -> _Doomed | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if dt.datetime.fromtimestamp(stat.st_mtime, tz=dt.UTC) > written_by:
        log.info("file written again since it was chosen; kept", path=path.name)
        return None
    return _Doomed(path, written_by, stat.st_size)


def _doomed_tree(folder: Path, written_by: dt.datetime) -> list[_Doomed]:
    found: list[_Doomed] = []
    for root, _dirs, names in os.walk(folder):
        found += filter(None, (_doomed_file(Path(root) / name, written_by) for name in names))
    return found


def _delete(doomed: Iterable[_Doomed]) -> None:
    """Delete each file unless it was written again since it was chosen (a receiver filed
    a new copy of the instance meanwhile)."""
    for item in doomed:
        if _doomed_file(item.path, item.written_by) is not None:
            item.path.unlink(missing_ok=True)


def _remove_empty_dirs(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) ``root`` while empty."""
    while directory != root and _inside(directory, root):
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): a receiver may be filing into it
            return
        directory = directory.parent


def _remove_empty_tree(folder: Path) -> None:
    for root, _dirs, _names in os.walk(folder, topdown=False):
        _remove_empty_dirs(Path(root), folder.parent)


class RetentionPass:
    """One retention pass over the database and the data folder. Each purge claims its
    rows, chooses its files and writes its audit row in one transaction, then deletes."""

    def __init__(
        self, sessions: sessionmaker[Session], settings: Settings, now: dt.datetime, dry_run: bool
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.now = now
        self.dry_run = dry_run
        self.actor = audit.Actor.node("retention")

    def purge_study(self, study: DoneStudy, reason: Reason) -> Purged | None:
        spool = self.settings.spool_dir
        with self.sessions.begin() as session:
            if not self.dry_run:
                claimed = session.execute(
                    update(Study)
                    .where(
                        Study.id == study.study_id,
                        Study.purged_at.is_(None),
                        Study.status == StudyStatus.COMPLETE,
                        Study.last_received_at == study.last_received_at,
                    )
                    .values(purged_at=self.now)
                ).rowcount  # type: ignore[attr-defined]
                if not claimed:  # another node purged it, or an instance came meanwhile
                    return None
            instances = session.execute(
                select(Instance.id, Instance.path, Instance.received_at)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.study_id == study.study_id, Instance.purged_at.is_(None))
            ).all()
            doomed = [
                found
                for _, path, received_at in instances
                if _inside(Path(path), spool)
                and (
                    found := _doomed_file(Path(path), as_utc(received_at) + WRITTEN_AFTER_TOLERANCE)
                )
            ]
            jobs = list(session.scalars(select(Job.id).where(Job.study_id == study.study_id)))
            purged = Purged.of(
                "study", study.study_instance_uid, None, doomed, reason, study.done_at
            )
            if self.dry_run:
                return purged
            ids = [instance_id for instance_id, _, _ in instances]
            for start in range(0, len(ids), 500):
                session.execute(
                    update(Instance)
                    .where(Instance.id.in_(ids[start : start + 500]))
                    .values(purged_at=self.now)
                )
            self._audit(session, purged, len(instances))
        _delete(doomed)
        for folder in {item.path.parent for item in doomed}:
            _remove_empty_dirs(folder, spool)
        for job_id in jobs:  # job folders left without outputs (a failed attempt's)
            self._remove_job_folder_without_outputs(job_id)
        return purged

    def purge_outputs(self, outputs: DoneOutputs, reason: Reason) -> Purged | None:
        outputs_dir = self.settings.outputs_dir
        folder = outputs_dir / f"job-{outputs.job_id}"
        with self.sessions.begin() as session:
            rows = session.execute(
                select(Output.id, Output.path).where(
                    Output.job_id == outputs.job_id, Output.purged_at.is_(None)
                )
            ).all()
            if not self.dry_run:
                claimed = session.execute(
                    update(Output)
                    .where(Output.id.in_([row.id for row in rows]), Output.purged_at.is_(None))
                    .values(purged_at=self.now)
                ).rowcount  # type: ignore[attr-defined]
                if not claimed:
                    return None
            doomed = _doomed_tree(folder, self.now)
            for _, path_text in rows:  # an output written elsewhere than the job's folder
                path = Path(path_text)
                if _inside(path, outputs_dir) and not _inside(path, folder):
                    doomed += filter(None, [_doomed_file(path, self.now)])
            purged = Purged.of(
                "outputs",
                outputs.study_instance_uid,
                outputs.job_id,
                doomed,
                reason,
                outputs.done_at,
            )
            if self.dry_run:
                return purged
            self._audit(session, purged, len(rows), outputs.series_instance_uid)
        _delete(doomed)
        _remove_empty_tree(folder)
        return purged

    def _remove_job_folder_without_outputs(self, job_id: int) -> None:
        with self.sessions() as session:
            kept = session.scalar(
                select(func.count(Output.id)).where(
                    Output.job_id == job_id, Output.purged_at.is_(None)
                )
            )
        folder = self.settings.outputs_dir / f"job-{job_id}"
        if not kept and folder.is_dir():
            _delete(_doomed_tree(folder, self.now))
            _remove_empty_tree(folder)

    def _audit(
        self, session: Session, purged: Purged, rows: int, series_uid: str | None = None
    ) -> None:
        audit.record(
            session,
            action=audit.AuditAction.DATA_PURGED,
            actor=self.actor,
            object_kind=(
                audit.AuditObjectKind.STUDY if purged.kind == "study" else audit.AuditObjectKind.JOB
            ),
            object_id=purged.job_id,
            study_instance_uid=purged.study_instance_uid,
            series_instance_uid=series_uid,
            count=rows,
            details={
                "what": "spool" if purged.kind == "study" else "outputs",
                "reason": purged.reason,
                "files": purged.files,
                "bytes": purged.bytes,
            },
            at=self.now,
        )
        log.info(
            "retention deletes files",
            what=purged.kind,
            study_uid=purged.study_instance_uid,
            job_id=purged.job_id,
            files=purged.files,
            bytes=purged.bytes,
            reason=purged.reason,
        )


def target_free_bytes(settings: Settings) -> int:
    """The free space the watermark keeps on the data folder's file system (0: none)."""
    target = settings.retention_free_bytes
    if settings.retention_free_percent:
        total = total_bytes(settings.data_dir)
        target = max(target, int(total * settings.retention_free_percent / 100))
    return target


def _commitment(session: Session, settings: Settings) -> list[str]:
    try:
        destinations: Sequence[Destination] = load_routing(session, settings).destinations
    except ConfigError:  # an invalid entry: the file's destinations still say enough
        destinations = settings.destinations
    return commitment_destinations(destinations)


def run_retention(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """One pass: what is done and old enough, then the disk watermark (see the module)."""
    now = now or utcnow()
    data_dir = settings.data_dir
    target = target_free_bytes(settings)
    report = RetentionReport(dry_run, free_bytes(data_dir), target)
    with sessions() as session:
        commitment = _commitment(session, settings)
        studies = done_studies(session, commitment)
        outputs = done_job_outputs(session, commitment)
    work = RetentionPass(sessions, settings, now, dry_run)
    kept_studies: list[DoneStudy] = []
    kept_outputs: list[DoneOutputs] = []
    spool_keep = dt.timedelta(hours=settings.retention_spool_hours)
    outputs_keep = dt.timedelta(hours=settings.retention_outputs_hours)
    for study in studies:
        if settings.retention_spool_hours and study.done_at <= now - spool_keep:
            _add(report, work.purge_study(study, "age"))
        else:
            kept_studies.append(study)
    for job_outputs in outputs:
        if settings.retention_outputs_hours and job_outputs.done_at <= now - outputs_keep:
            _add(report, work.purge_outputs(job_outputs, "age"))
        else:
            kept_outputs.append(job_outputs)
    # A dry run frees nothing: it counts what would be freed.
    free = report.free_bytes_before + report.bytes_freed if dry_run else free_bytes(data_dir)
    oldest_first: list[DoneStudy | DoneOutputs] = sorted(
        [*kept_studies, *kept_outputs], key=lambda item: item.done_at
    )
    for item in oldest_first:
        if free >= target:
            break
        if isinstance(item, DoneStudy):
            purged = work.purge_study(item, "disk")
        else:
            purged = work.purge_outputs(item, "disk")
        _add(report, purged)
        if dry_run:
            free += purged.bytes if purged is not None else 0
        else:
            free = free_bytes(data_dir)
    report.free_bytes_after = free
    if free < target:
        log.warning(
            "disk below the retention watermark and nothing more is done",
            free_bytes=free,
            target_free_bytes=target,
        )
    return report


def _add(report: RetentionReport, purged: Purged | None) -> None:
    if purged is not None:
        report.purged.append(purged)


class RetentionThread:
    """Runs ``run_retention`` in the node every ``retention_interval_seconds``, and sooner
    when the free space falls below the watermark."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        settings = self.settings
        interval = settings.retention_interval_seconds
        check = min(interval, WATERMARK_CHECK_SECONDS)
        waited = interval  # a first pass at start
        while not self._stop.is_set():
            try:
                short = free_bytes(settings.data_dir) < target_free_bytes(settings)
                if waited >= interval or short:
                    waited = 0.0
                    run_retention(self.sessions, settings)
            except Exception:
                log.exception("retention pass failed")
            self._stop.wait(check)
            waited += check
