"""The de-identification round trip through an outside destination (``deidentify`` set).

Out: each rule that names such a destination sends it the source series it matched
(``enqueue_sources``; the node's own outputs are not sent there), and the exporter
de-identifies each instance just before sending (``deidentified_copies``), after sealing
what re-identification needs in the pseudonym map.

Back: a study the node receives whose StudyInstanceUID is a pseudonymous one in the map
is a result of that destination: when it completes, ``reidentify_returned_study`` writes
re-identified copies of its instances (original patient, study and every UID the map
knows) and queues them for the destination's ``results_to``, instead of routing it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, Job, Pseudonym, Series, Study
from dicom_node.config import Settings
from dicom_node.export.queue import Claimed, enqueue
from dicom_node.export.target import ExportTarget, export_target
from dicom_node.export.transport import Outcome
from dicom_node.security import audit
from dicom_node.security.crypto import read_dicom, save_dataset
from dicom_node.security.deid import (
    BurnedInAnnotationError,
    Deidentifier,
    PseudonymRecord,
    secret_from,
)
from dicom_node.security.keys import KeyRing
from dicom_node.security.reid import recall, reidentify, remember

log = structlog.get_logger(__name__)

REIDENTIFIED_FOLDER = "reidentified"


# -- what the round trip tells the log and the audit trail ------------------------------------


def deidentified_copies_sent(destination: str, pseudonymous_study_uids: Iterable[str]) -> None:
    """De-identified copies of these studies were delivered to ``destination`` (logged by
    their pseudonymous UIDs; the audit rows are the export queue's, in the transaction
    that records each delivery as ``deidentified_sent``)."""
    log.info(
        "de-identified copies sent",
        destination=destination,
        studies=sorted(set(pseudonymous_study_uids)),
    )


def result_reidentified(
    session: Session, destination: str, study_instance_uid: str, instances: int
) -> None:
    """A result ``destination`` sent back was re-identified (``study_instance_uid`` is the
    original study's) and queued for its ``results_to``: audited in ``session``'s
    transaction, the one that queues the re-identified copies."""
    audit.record(
        session,
        action=audit.AuditAction.RESULT_REIDENTIFIED,
        actor=audit.Actor.node("re-identifier"),
        object_kind=audit.AuditObjectKind.STUDY,
        study_instance_uid=study_instance_uid,
        count=instances,
        details={"destination": destination},
    )
    log.info(
        "result re-identified",
        destination=destination,
        study_uid=study_instance_uid,
        instances=instances,
    )


# -- out -------------------------------------------------------------------------------------


def enqueue_sources(
    session: Session, settings: Settings, jobs: Sequence[Job], keys: KeyRing | None
) -> int:
    """Queue each job's source series for the de-identifying destinations it names
    (``keys`` read the spool's files when it is encrypted)."""
    by_name = {destination.name: destination for destination in settings.destinations}
    queued = 0
    for job in jobs:
        outside = [by_name[n] for n in job.destinations if n in by_name and by_name[n].deidentify]
        if not outside:
            continue
        paths = session.scalars(
            select(Instance.path).where(
                Instance.series_id == job.series_id, Instance.purged_at.is_(None)
            )
        )
        files = [Path(path) for path in paths]
        for destination in outside:
            target = export_target(destination, settings.ae_title)
            queued += len(enqueue(session, target, files, keys=keys))
    return queued


def deidentified_copies(
    sessions: sessionmaker[Session],
    keys: KeyRing,
    target: ExportTarget,
    batch: Sequence[Claimed],
    folder: Path,
) -> tuple[list[Claimed], dict[int, Outcome], list[PseudonymRecord]]:
    """De-identified copies of the claimed files in ``folder`` (the rows pointing at them),
    an outcome for each that may not go (burned-in text, unreadable) and the records, which
    are in the pseudonym map before this returns."""
    assert target.deidentify is not None
    deidentifier = Deidentifier(secret_from(keys), target.deidentify)
    copies: list[Claimed] = []
    refused: dict[int, Outcome] = {}
    records: list[PseudonymRecord] = []
    for claimed in batch:
        try:
            ds = read_dicom(Path(claimed.path), keys, force=True)
            record = deidentifier.deidentify(ds)
            path = folder / f"{claimed.id}.dcm"
            ds.save_as(path, enforce_file_format=True)
        except BurnedInAnnotationError as exc:
            refused[claimed.id] = Outcome(False, f"not sent: {exc}")
            continue
        except Exception as exc:  # an unreadable file must not stop the others
            refused[claimed.id] = Outcome(False, f"cannot de-identify: {type(exc).__name__}")
            continue
        copies.append(dataclasses.replace(claimed, path=str(path)))
        records.append(record)
    with sessions.begin() as session:
        for record in records:
            remember(session, keys, target.name, record)
    return copies, refused, records


# -- back ------------------------------------------------------------------------------------


def reidentify_returned_study(
    session: Session, settings: Settings, keys: KeyRing | None, study_id: int
) -> bool:
    """Whether the study is a result that came back under a pseudonymous study UID; if so,
    its re-identified copies are queued for the destination's ``results_to``."""
    study = session.get(Study, study_id)
    if study is None:
        return False
    uid = study.study_instance_uid
    known = session.scalar(select(Pseudonym.id).where(Pseudonym.pseudonymous_study_uid == uid))
    if known is None:
        return False
    if keys is None:
        log.error("a returned result cannot be re-identified without the key", study_id=study_id)
        return True
    found = recall(session, keys, uid)
    assert found is not None
    destination_name, record = found
    destination = next((d for d in settings.destinations if d.name == destination_name), None)
    results_to = destination.results_to if destination is not None else ()
    paths = session.scalars(
        select(Instance.path)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
    )
    folder = settings.outputs_dir / REIDENTIFIED_FOLDER / f"study-{study_id}"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in paths:
        ds = read_dicom(Path(path), keys, force=True)
        reidentify(ds, record)
        target = folder / f"{ds.SOPInstanceUID}.dcm"
        save_dataset(ds, target, keys)
        written.append(target)
    targets = [d for d in settings.destinations if d.name in results_to]
    for result_destination in targets:
        enqueue(session, export_target(result_destination, settings.ae_title), written, keys=keys)
    if not targets:
        log.warning("a re-identified result has no results_to", destination=destination_name)
    result_reidentified(session, destination_name, record.original_study_uid, len(written))
    return True
