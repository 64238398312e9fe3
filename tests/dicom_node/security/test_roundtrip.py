"""The round trip at unit level: an in-process node is both the outside destination that
receives the de-identified copies and the node that gets the result back."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditAction, AuditEvent, Export, Instance, Pseudonym, Series, Study
from db.session import make_engine, make_sessionmaker
from dicom_node.config import Destination, Settings
from dicom_node.export.queue import enqueue
from dicom_node.export.target import ExportTarget, export_target
from dicom_node.export.worker import deliver_due
from dicom_node.node import Node
from dicom_node.security.deid import Deidentifier, DeidProfile, secret_from
from dicom_node.security.keys import KeyRing
from dicom_node.security.roundtrip import reidentify_returned_study
from dicom_node.synthetic import generate_series
from tests.dicom_node.test_cli_deid import dciodvfy_errors

KEYS = KeyRing((b"t" * 32,))
T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
NAME, PATIENT_ID = "Roe^Richard", "PID-4455"


@pytest.fixture
def sessions(node: Node, settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.effective_database_url)  # the node's own database
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    series = generate_series(
        num_slices=3,
        rows=32,
        columns=32,
        uid_seed="roundtrip",
        patient_name=NAME,
        patient_id=PATIENT_ID,
    )
    return series.write(tmp_path / "series")


def outside(settings: Settings, name: str = "outside", **kwargs: object) -> ExportTarget:
    destination = Destination.model_validate(
        {
            "name": name,
            "host": "127.0.0.1",
            "port": settings.port,
            "ae_title": settings.ae_title,
            "deidentify": "basic",
            **kwargs,
        }
    )
    return export_target(destination, "EXPORTER")


def spooled(settings: Settings) -> list[Path]:
    return sorted(settings.spool_dir.rglob("*.dcm"))


def send(
    sessions: sessionmaker[Session], target: ExportTarget, files: list[Path], keys: KeyRing | None
) -> None:
    with sessions.begin() as session:
        enqueue(session, target, files, now=T0)
    deliver_due(sessions, [target], T0, keys=keys)


def test_only_deidentified_copies_leave_and_the_map_is_sealed_first(
    sessions: sessionmaker[Session], settings: Settings, files: list[Path]
) -> None:
    send(sessions, outside(settings), files, KEYS)
    arrived = spooled(settings)
    assert len(arrived) == 3
    deidentifier = Deidentifier(secret_from(KEYS), DeidProfile())
    originals = {str(dcmread(p).SOPInstanceUID) for p in files}
    assert {p.stem for p in arrived} == {deidentifier.pseudonymous_uid(u) for u in originals}
    for path in arrived:
        data = path.read_bytes()
        assert b"Roe" not in data and PATIENT_ID.encode() not in data
    assert dciodvfy_errors(arrived[0]) <= dciodvfy_errors(files[0])
    with sessions() as session:
        (row,) = session.scalars(select(Pseudonym))
        assert row.destination == "outside" and b"Roe" not in row.sealed
        actions = [event.action for event in session.scalars(select(AuditEvent))]
    assert actions.count(AuditAction.DEIDENTIFIED_SENT) == len(files)
    assert AuditAction.OUTPUT_EXPORTED not in actions


def test_without_the_key_nothing_is_sent(
    sessions: sessionmaker[Session], settings: Settings, files: list[Path]
) -> None:
    send(sessions, outside(settings), files, None)
    assert spooled(settings) == []
    with sessions() as session:
        errors = {row.last_error for row in session.scalars(select(Export))}
    assert errors == {
        "not sent: de-identification needs the node's key (spool_encryption_key_file)"
    }


def test_an_image_with_burned_in_text_is_not_sent_unless_allowed(
    sessions: sessionmaker[Session], settings: Settings, files: list[Path]
) -> None:
    ds = dcmread(files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(files[0])
    send(sessions, outside(settings), files, KEYS)
    assert len(spooled(settings)) == 2
    with sessions() as session:
        errors = [row.last_error for row in session.scalars(select(Export)) if row.last_error]
    assert len(errors) == 1 and "burned into its pixels" in errors[0]
    send(sessions, outside(settings, allow_burned_in=True, name="outside2"), files, KEYS)
    assert len(spooled(settings)) == 3


def wait_for_study(sessions: sessionmaker[Session], uid: str, instances: int = 3) -> int:
    """The study's id once the node has indexed all its instances."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sessions() as session:
            found = session.execute(
                select(Study.id, func.count(Instance.id))
                .join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id)
                .where(Study.study_instance_uid == uid)
                .group_by(Study.id)
            ).first()
        if found is not None and found[1] == instances:
            return int(found[0])
        time.sleep(0.1)
    raise AssertionError("the node did not index the study")


def test_a_study_back_under_its_pseudonymous_uid_is_reidentified_for_results_to(
    sessions: sessionmaker[Session], settings: Settings, files: list[Path], tmp_path: Path
) -> None:
    target = outside(settings)
    send(sessions, target, files, KEYS)
    pseudonymous = str(dcmread(spooled(settings)[0]).StudyInstanceUID)
    study_id = wait_for_study(sessions, pseudonymous)
    pacs = Destination.model_validate({"name": "pacs", "host": "127.0.0.1", "port": 1})
    returned = Destination.model_validate(
        {
            "name": "outside",
            "host": "127.0.0.1",
            "port": settings.port,
            "deidentify": "basic",
            "results_to": ["pacs"],
        }
    )
    routing = settings.model_copy(
        update={"destinations": (pacs, returned), "spool_encryption_key_file": tmp_path / "k"}
    )
    with sessions.begin() as session:
        assert reidentify_returned_study(session, routing, KEYS, study_id)
        queued = list(session.scalars(select(Export).where(Export.destination == "pacs")))
    originals = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in files}
    assert {row.sop_instance_uid for row in queued} == set(originals)
    for row in queued:
        ds = dcmread(row.path)
        original = originals[ds.SOPInstanceUID]
        assert (str(ds.PatientName), ds.PatientID) == (NAME, PATIENT_ID)
        assert ds.StudyInstanceUID == original.StudyInstanceUID
        assert ds.SeriesInstanceUID == original.SeriesInstanceUID
        assert ds.FrameOfReferenceUID == original.FrameOfReferenceUID
        assert "PatientIdentityRemoved" not in ds
    with sessions() as session:
        (event,) = session.scalars(
            select(AuditEvent).where(AuditEvent.action == AuditAction.RESULT_REIDENTIFIED)
        )
    assert (event.study_instance_uid, event.count) == (original.StudyInstanceUID, len(files))


def test_a_study_the_map_does_not_know_is_routed_as_usual(
    sessions: sessionmaker[Session], settings: Settings, files: list[Path]
) -> None:
    from dicom_node.scu import scan_files
    from dicom_node.scu import send as store

    found, _ = scan_files(files)
    store(found, "127.0.0.1", settings.port, calling_ae="CT", called_ae=settings.ae_title)
    study_id = wait_for_study(sessions, str(dcmread(files[0]).StudyInstanceUID))
    with sessions.begin() as session:
        assert not reidentify_returned_study(session, settings, KEYS, study_id)
