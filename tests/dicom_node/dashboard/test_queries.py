"""The overview's figures, counted in SQL from rows placed at known times."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from db.enums import JobState
from db.models import ExportState
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.dashboard import queries
from tests.dicom_node.dashboard.dashboard_support import add_export, add_job, add_study

NOW = dt.datetime(2030, 5, 1, 12, 0, tzinfo=dt.UTC)


def minutes_ago(minutes: float) -> dt.datetime:
    return NOW - dt.timedelta(minutes=minutes)


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    upgrade(database_url)
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def test_instances_and_completed_studies_fall_in_their_buckets(session: Session) -> None:
    # 6 buckets of 10 minutes over the last hour
    add_study(session, [minutes_ago(55), minutes_ago(54)], completed_at=minutes_ago(52))
    add_study(session, [minutes_ago(5)] * 3, completed_at=minutes_ago(1))
    add_study(session, [minutes_ago(90)])  # before the window
    activity = queries.activity(session, NOW, hours=1, buckets=6)
    assert activity.bucket_seconds == 600
    assert activity.instances == [2, 0, 0, 0, 0, 3]
    assert activity.studies_completed == [1, 0, 0, 0, 0, 1]
    assert activity.instances_per_second[-1] == pytest.approx(3 / 600)
    assert activity.bucket_start(5) == minutes_ago(10)


def test_states_turnaround_and_failures(session: Session) -> None:
    delivered = add_study(session, [minutes_ago(30)], completed_at=minutes_ago(29))
    good = add_job(session, delivered, JobState.SUCCEEDED, finished_at=minutes_ago(28))
    add_export(session, good, ExportState.DELIVERED, delivered_at=minutes_ago(27))
    add_export(session, good, ExportState.DELIVERED, delivered_at=minutes_ago(26))
    slow = add_study(session, [minutes_ago(20)], completed_at=minutes_ago(19))
    slow_job = add_job(session, slow, JobState.SUCCEEDED, finished_at=minutes_ago(15))
    add_export(session, slow_job, ExportState.DELIVERED, delivered_at=minutes_ago(10))
    undelivered = add_study(session, [minutes_ago(9)], completed_at=minutes_ago(8))
    waiting = add_job(session, undelivered, JobState.SUCCEEDED, finished_at=minutes_ago(7))
    add_export(session, waiting, ExportState.DELIVERED, delivered_at=minutes_ago(6))
    add_export(session, waiting, ExportState.FAILED, error="association refused")
    broken = add_study(session, [minutes_ago(5)], completed_at=minutes_ago(4))
    add_job(session, broken, JobState.FAILED, rule="bad-rule", error="boom", finished_at=NOW)
    add_job(session, broken, JobState.QUEUED)

    assert queries.jobs_by_state(session) == {
        "queued": 1,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 0,
    }
    exports = queries.exports_by_state(session)
    assert exports["delivered"] == 4 and exports["failed"] == 1 and exports["pending"] == 0

    # the study with an export not delivered is left out; 4 and 10 minutes for the others
    turnaround = queries.turnaround(session, minutes_ago(60))
    assert turnaround.studies == 2
    assert turnaround.median_seconds == pytest.approx(7 * 60)
    assert turnaround.slowest_seconds == pytest.approx(10 * 60)
    assert queries.turnaround(session, minutes_ago(1)).studies == 0

    failures = queries.recent_failures(session, limit=10)
    assert [(f.kind, f.what, f.error) for f in failures] == [
        ("job", "bad-rule", "boom"),
        ("export", "pacs", "association refused"),
    ]
    assert failures[0].study_instance_uid == broken.study_instance_uid
    assert len(queries.recent_failures(session, limit=1)) == 1
