from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    Association,
    AssociationStatus,
    Instance,
    Series,
    Study,
    StudyEvent,
    StudyStatus,
    as_utc,
)
from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.index import Indexer, reconcile, stored_record_from_file, write_batch
from dicom_node.records import AssociationClosed, AssociationOpened, InstanceStored
from dicom_node.storage import InstanceKey, Spool


def sessions_for(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    return make_sessionmaker(make_engine(url))


def record(study: str, series: str, sop: str, path: Path, at: dt.datetime) -> InstanceStored:
    return InstanceStored(
        key=InstanceKey.checked(study, series, sop),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=path,
        size_bytes=10,
        received_at=at,
        association_id=None,
        modality="CT",
    )


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_batch_creates_study_series_instances(tmp_path: Path) -> None:
    sessions = sessions_for(tmp_path)
    records = [record("1.1", "1.1.1", f"1.1.1.{i}", tmp_path / f"{i}", NOW) for i in range(5)]
    records.append(record("1.1", "1.1.2", "1.1.2.1", tmp_path / "x", NOW))
    with sessions.begin() as session:
        write_batch(session, records)
    with sessions() as session:
        assert session.scalar(select(func.count(Study.id))) == 1
        assert session.scalar(select(func.count(Series.id))) == 2
        assert session.scalar(select(func.count(Instance.id))) == 6


def test_a_later_batch_of_a_known_series_inserts_only_its_instances(tmp_path: Path) -> None:
    sessions = sessions_for(tmp_path)
    with sessions.begin() as session:
        write_batch(session, [record("1.1", "1.1.1", "1.1.1.1", tmp_path / "1", NOW)])
    inserts: list[str] = []

    def count_insert(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(statement.split()[2])

    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", count_insert)
    try:
        with sessions.begin() as session:
            write_batch(session, [record("1.1", "1.1.1", "1.1.1.2", tmp_path / "2", NOW)])
    finally:
        event.remove(engine, "before_cursor_execute", count_insert)
    assert inserts == ["instances", "audit_events"]  # the batch's one audit row


def test_association_rows_and_counts(tmp_path: Path) -> None:
    sessions = sessions_for(tmp_path)
    opened = AssociationOpened("a-1", "CT1", "DICOMNODE", "127.0.0.1", 5000, True, None, NOW)
    stored = record("1.1", "1.1.1", "1.1.1.1", tmp_path / "f", NOW)
    stored = InstanceStored(**{**stored.__dict__, "association_id": "a-1"})
    closed = AssociationClosed("a-1", AssociationStatus.RELEASED, NOW, 1, 0, 10)
    with sessions.begin() as session:
        write_batch(session, [opened, stored, closed])
    with sessions() as session:
        association = session.get(Association, "a-1")
        assert association is not None
        assert (association.status, association.instances_received) == ("released", 1)
        instance = session.scalars(select(Instance)).one()
        assert instance.association_id == "a-1"


def test_resent_instance_in_other_series_moves_and_old_file_is_reported(tmp_path: Path) -> None:
    sessions = sessions_for(tmp_path)
    with sessions.begin() as session:
        write_batch(session, [record("1.1", "1.1.1", "1.1.1.1", tmp_path / "old", NOW)])
    with sessions.begin() as session:
        obsolete = write_batch(session, [record("1.1", "1.1.9", "1.1.1.1", tmp_path / "new", NOW)])
    assert obsolete == [tmp_path / "old"]
    with sessions() as session:
        instance = session.scalars(select(Instance)).one()
        assert instance.path == str(tmp_path / "new")
        assert session.get(Series, instance.series_id).series_instance_uid == "1.1.9"  # type: ignore[union-attr]


def test_instance_after_completion_reopens_study(tmp_path: Path) -> None:
    from dicom_node.assembler import complete_quiet_studies

    sessions = sessions_for(tmp_path)
    with sessions.begin() as session:
        write_batch(session, [record("1.1", "1.1.1", "1.1.1.1", tmp_path / "a", NOW)])
    with sessions.begin() as session:
        assert len(complete_quiet_studies(session, 10, NOW + dt.timedelta(seconds=11))) == 1
    later = NOW + dt.timedelta(seconds=20)
    with sessions.begin() as session:
        write_batch(session, [record("1.1", "1.1.1", "1.1.1.2", tmp_path / "b", later)])
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.status == "receiving" and study.completed_at is None
        events = [e.event for e in session.scalars(select(StudyEvent).order_by(StudyEvent.id))]
        assert events == ["complete", "reopened"]


def test_indexer_thread_batches_and_flushes(tmp_path: Path) -> None:
    sessions = sessions_for(tmp_path)
    indexer = Indexer(sessions, batch_size=7, flush_seconds=0.01)
    indexer.start()
    for i in range(50):
        indexer.put(record("1.1", "1.1.1", f"1.1.1.{i}", tmp_path / f"{i}", NOW))
    assert indexer.flush(10)
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 50
    indexer.stop()


def test_reconcile_indexes_spooled_files_the_database_lacks(tmp_path: Path, small_ct) -> None:  # type: ignore[no-untyped-def]
    sessions = sessions_for(tmp_path)
    spool = Spool(tmp_path / "spool")
    for dataset in small_ct.datasets:
        key = InstanceKey.checked(
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        )
        from io import BytesIO

        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        spool.write(key, [buffer.getvalue()])
    # one file already indexed, one garbage file, one interrupted write
    first = next(spool.iter_files())
    with sessions.begin() as session:
        write_batch(session, [stored_record_from_file(first)])
    garbage = first.parent / "9.9.9.dcm"
    garbage.write_bytes(b"not dicom")
    (first.parent / ".incoming-xyz").write_bytes(b"half")

    added = reconcile(spool, sessions)

    assert added == len(small_ct.datasets) - 1
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == len(small_ct.datasets)
    assert garbage.exists(), "a file that cannot be indexed is kept for a person to look at"
    assert not (first.parent / ".incoming-xyz").exists()
    assert reconcile(spool, sessions) == 0


def test_another_node_indexing_the_same_study_meanwhile_is_not_an_error(tmp_path: Path) -> None:
    """Between this node's look-up and its insert, another node inserts the same study and
    series (with another instance of them): one study, one series, both instances."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    mine = [record("1.1", "1.1.1", "1.1.1.1", tmp_path / "1", NOW)]
    theirs = [record("1.1", "1.1.1", "1.1.1.2", tmp_path / "2", NOW - dt.timedelta(seconds=5))]
    racing = writer_gets_in_first(engine, "studies", lambda other: write_batch(other, theirs))
    with racing as race, sessions.begin() as session:
        assert write_batch(session, mine) == []
    assert race.happened
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert session.scalar(select(func.count(Series.id))) == 1
        assert session.scalar(select(func.count(Instance.id))) == 2
        assert (study.status, as_utc(study.last_received_at)) == (StudyStatus.RECEIVING, NOW)
    engine.dispose()


def test_associations_and_stored_instances_are_audited_with_the_batch(tmp_path: Path) -> None:
    from dicom_node.security.audit import AuditAction
    from tests.dicom_node.security.audit_support import audit_rows

    sessions = sessions_for(tmp_path)
    opened = AssociationOpened("a-1", "CT1", "DICOMNODE", "10.0.0.5", 4100, True, None, NOW)
    refused = AssociationOpened(
        "a-2", "INTRUDER", "DICOMNODE", "10.0.0.9", 4200, False, "calling AE title not allowed", NOW
    )

    def sent(series: str, sop: str) -> InstanceStored:
        stored = record("1.1", series, sop, tmp_path / sop, NOW)
        return InstanceStored(**{**stored.__dict__, "association_id": "a-1"})

    with sessions.begin() as session:
        write_batch(
            session,
            [
                opened,
                refused,
                sent("1.1.1", "1.1.1.1"),
                sent("1.1.1", "1.1.1.2"),
                sent("1.1.2", "1.1.2.1"),
            ],
        )
    with sessions.begin() as session:  # a later batch, and a file re-indexed from the spool
        write_batch(session, [sent("1.1.1", "1.1.1.3")])
        write_batch(session, [record("1.1", "1.1.1", "1.1.1.4", tmp_path / "r", NOW)])
    with pytest.raises(RuntimeError), sessions.begin() as session:
        write_batch(session, [sent("1.1.1", "1.1.1.5")])
        raise RuntimeError("the batch's transaction fails")
    accepted, refused_row = audit_rows(
        sessions, AuditAction.ASSOCIATION_ACCEPTED, AuditAction.ASSOCIATION_REFUSED
    )
    assert (accepted["actor"], accepted["actor_address"], accepted["object_id"]) == (
        "CT1",
        "10.0.0.5:4100",
        "a-1",
    )
    assert (refused_row["action"], refused_row["outcome"], refused_row["reason"]) == (
        "association_refused",
        "failure",
        "calling AE title not allowed",
    )
    stored_rows = audit_rows(sessions, AuditAction.INSTANCES_STORED)
    assert [
        (row["actor"], row["series_instance_uid"], row["count"], row["sop_instance_uid"])
        for row in stored_rows
    ] == [
        ("CT1", "1.1.1", 2, None),
        ("CT1", "1.1.2", 1, "1.1.2.1"),
        ("CT1", "1.1.1", 1, "1.1.1.3"),
        ("indexer", "1.1.1", 1, "1.1.1.4"),
    ]
    assert {row["study_instance_uid"] for row in stored_rows} == {"1.1"}
    assert stored_rows[0]["details"] == {"bytes": 20}


def test_reconcile_reads_an_encrypted_spool_after_a_key_rotation(tmp_path: Path, small_ct) -> None:  # type: ignore[no-untyped-def]
    """Files spooled in clear before encryption was turned on, and files encrypted under
    the key that was current then, are indexed by a node whose key file has a new key
    first and the old one after it; a key file without the old key indexes none of those."""
    from io import BytesIO

    from pydicom.dataset import Dataset

    from dicom_node.security.keys import KeyRing

    def encoded(dataset: Dataset) -> bytes:
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    old, new = KeyRing.generate(), KeyRing.generate()
    for number, dataset in enumerate(small_ct.datasets):
        spool = Spool(tmp_path / "spool", keys=None if number < 2 else old)
        key = InstanceKey.checked(
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        )
        spool.write(key, [encoded(dataset)])

    lacking = Spool(tmp_path / "spool", keys=new)
    assert reconcile(lacking, sessions_for(tmp_path / "lacking")) == 2  # the clear ones

    rotated = Spool(tmp_path / "spool", keys=KeyRing((new.keys[0], old.keys[0])))
    sessions = sessions_for(tmp_path)
    assert reconcile(rotated, sessions) == len(small_ct.datasets)
    with sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.size_bytes))
        indexed = {str(uid): size for uid, size in rows}
    sizes = {str(dataset.SOPInstanceUID): len(encoded(dataset)) for dataset in small_ct.datasets}
    assert indexed == sizes  # the instances' own sizes, as the receiver records them
