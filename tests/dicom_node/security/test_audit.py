"""The audit trail's writer and readers: a row per call, in the caller's transaction."""

from __future__ import annotations

import datetime as dt
import getpass

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.security import audit
from dicom_node.security.audit import (
    Actor,
    AuditAction,
    AuditActorKind,
    AuditObjectKind,
    AuditOutcome,
    AuditQuery,
    event_as_dict,
    read_events,
    record,
)
from tests.dicom_node.security.audit_support import audit_rows

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
STUDY = "1.2.826.0.1.3680043.10.1433.7"


def stored_at(session: Session, minutes: int, study: str | None = STUDY) -> None:
    record(
        session,
        action=AuditAction.INSTANCES_STORED,
        actor=Actor.dicom_peer("CT1", "10.0.0.5", 4100),
        study_instance_uid=study,
        count=minutes,
        at=T0 + dt.timedelta(minutes=minutes),
    )


def test_a_row_commits_with_its_transaction_and_rolls_back_with_it(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        stored_at(session, 1)
    with pytest.raises(RuntimeError), sessions.begin() as session:
        stored_at(session, 2)
        raise RuntimeError("the change failed")
    assert [row["count"] for row in audit_rows(sessions)] == [1]


def test_a_row_says_who_did_what_to_which_object(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        record(
            session,
            action=AuditAction.JOB_RAN,
            actor=Actor.node("dispatcher"),
            outcome=AuditOutcome.FAILURE,
            reason="x" * 5000,
            object_kind=AuditObjectKind.JOB,
            object_id=42,
            study_instance_uid=STUDY,
            details={"rule": "ct"},
            at=T0,
        )
    (row,) = audit_rows(sessions)
    assert row == {
        "id": row["id"],
        "at": T0.isoformat(),
        "actor_kind": "node",
        "actor": "dispatcher",
        "actor_address": None,
        "action": "job_ran",
        "outcome": "failure",
        "reason": "x" * audit.REASON_LIMIT,
        "object_kind": "job",
        "object_id": "42",
        "study_instance_uid": STUDY,
        "series_instance_uid": None,
        "sop_instance_uid": None,
        "count": None,
        "details": {"rule": "ct"},
    }


def test_reading_filters_by_time_study_and_action_and_keeps_the_latest(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        for minutes in range(1, 6):
            stored_at(session, minutes, STUDY if minutes % 2 else "1.2.3")
        record(session, action=AuditAction.PHI_READ, actor=Actor.os_user(), at=T0)
    with sessions() as session:

        def counts(query: AuditQuery) -> list[int | None]:
            return [event.count for event in read_events(session, query)]

        assert counts(AuditQuery(since=T0 + dt.timedelta(minutes=3))) == [3, 4, 5]
        assert counts(AuditQuery(study_instance_uid=STUDY)) == [1, 3, 5]
        assert counts(AuditQuery(actions=[AuditAction.PHI_READ])) == [None]
        assert counts(AuditQuery(limit=2)) == [4, 5]  # the latest two, oldest first
        first = read_events(session, AuditQuery(limit=100))[1]
        assert event_as_dict(first)["actor_address"] == "10.0.0.5:4100"


def test_the_os_user_is_named_even_without_a_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Actor.os_user() == Actor(AuditActorKind.OS_USER, getpass.getuser())

    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.setattr(getpass, "getuser", no_user)
    assert Actor.os_user().name.startswith("uid ")
