"""Trying a rule on the studies in the database: most recent first, bounded, writing nothing,
saying which series a job of the rule has already."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Job
from dicom_node.config import Rule
from dicom_node.jobs.state import create_jobs
from dicom_node.rule_tester import try_rule
from dicom_node.storage import Spool
from tests.dicom_node import test_routing
from tests.dicom_node.test_routing import NOW, STUDY_UID, add_series, settings_with

sessions = test_routing.sessions
spool = test_routing.spool

CT_RULE = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}
OTHER_STUDY = "1.2.826.0.1.3680043.10.1234.2"


def counts(session: Session) -> tuple[int | None, int | None]:
    return (
        session.scalar(select(func.count(Job.id))),
        session.scalar(select(func.count(AuditEvent.id))),
    )


def test_most_recent_studies_first_within_the_limits(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    add_series(spool, sessions, number=2, modality="MR")
    later = NOW + dt.timedelta(hours=1)
    add_series(spool, sessions, number=3, study_uid=OTHER_STUDY, received_at=later)
    rule = Rule.model_validate(CT_RULE)
    settings = settings_with()
    with sessions() as session:
        before = counts(session)
        trial = try_rule(session, settings, rule)
        assert [s.study.study_instance_uid for s in trial.studies] == [OTHER_STUDY, STUDY_UID]
        assert [[t.matched for t in s.series] for s in trial.studies] == [[True], [True, False]]
        assert trial.failures() == {"match.Modality": 1}
        [recent] = try_rule(session, settings, rule, limit=1).studies
        assert recent.study.study_instance_uid == OTHER_STUDY
        since = try_rule(session, settings, rule, since=later - dt.timedelta(minutes=1))
        assert len(since.studies) == 1
        assert counts(session) == before  # no job, no audit row


def test_a_disabled_rule_is_tried_as_if_enabled_and_routed_series_are_marked(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    with sessions.begin() as session:
        assert (
            len(create_jobs(session, settings_with(CT_RULE), test_routing.study_id(sessions))) == 1
        )
    disabled = Rule.model_validate({**CT_RULE, "enabled": False})
    with sessions() as session:
        trial = try_rule(session, settings_with(), disabled)
    [series] = trial.series
    assert series.matched and series.already_routed
    assert "disabled" in trial.notes[0]
    other = Rule.model_validate({**CT_RULE, "name": "other"})
    with sessions() as session:
        assert not try_rule(session, settings_with(), other).series[0].already_routed
