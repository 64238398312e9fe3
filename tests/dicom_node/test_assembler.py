from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import select

from db.models import Study, StudyEvent
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.assembler import StudyAssembler, StudyCompleted
from dicom_node.index import write_batch
from dicom_node.records import InstanceStored
from dicom_node.security.audit import AuditAction
from dicom_node.storage import InstanceKey
from tests.dicom_node.security.audit_support import audit_rows

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def stored(study: str, sop: str, at: dt.datetime) -> InstanceStored:
    return InstanceStored(
        key=InstanceKey.checked(study, study + ".1", sop),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2",
        path=Path("/nonexistent") / sop,
        size_bytes=1,
        received_at=at,
        association_id=None,
    )


def test_quiet_study_completes_once_and_listeners_hear(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions.begin() as session:
        write_batch(session, [stored("1.5", "1.5.1.1", T0), stored("1.5", "1.5.1.2", T0)])
        write_batch(session, [stored("1.6", "1.6.1.1", T0 + dt.timedelta(seconds=50))])
    heard: list[StudyCompleted] = []
    assembler = StudyAssembler(sessions, quiet_seconds=30)
    assembler.subscribe(heard.append)

    assert assembler.check(T0 + dt.timedelta(seconds=29)) == []
    done = assembler.check(T0 + dt.timedelta(seconds=31))
    assert [(e.study_instance_uid, e.num_instances) for e in done] == [("1.5", 2)]
    assert heard == done
    assert assembler.check(T0 + dt.timedelta(seconds=60)) == []  # 1.6 still within its quiet time
    assert [e.study_instance_uid for e in assembler.check(T0 + dt.timedelta(seconds=81))] == ["1.6"]

    with sessions() as session:
        statuses = {s.study_instance_uid: s.status for s in session.scalars(select(Study))}
        assert statuses == {"1.5": "complete", "1.6": "complete"}
        events = session.scalars(select(StudyEvent)).all()
        assert [(e.event, e.num_instances, e.consumed_at) for e in events] == [
            ("complete", 2, None),
            ("complete", 1, None),
        ]
    completions = audit_rows(sessions, AuditAction.STUDY_COMPLETED)
    assert [(row["study_instance_uid"], row["count"], row["actor"]) for row in completions] == [
        ("1.5", 2, "assembler"),
        ("1.6", 1, "assembler"),
    ]
    assert completions[0]["at"] == (T0 + dt.timedelta(seconds=31)).isoformat()
