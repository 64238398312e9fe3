"""Trying a routing rule on the studies already in the database, before it goes live.

``try_rule`` describes each series of the most recent studies the way the dispatcher does
(``routing.select_series``) and checks the rule against it with ``routing.explain``, the
function routing itself decides with: so the answer is what the dispatcher would do.
Nothing is created or written (no job, no audit row); a disabled rule is tried as if it
were enabled, and the answer says it is disabled.

Nothing in the answer is patient data: studies and series are named by their UIDs,
dates, descriptions and numbers, and a criterion on a patient attribute or a person name
says only whether it matched.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, Study
from dicom_node.config import Rule, Settings
from dicom_node.model_registry import plugins_and_models
from dicom_node.routing import CriterionCheck, SeriesCandidate, explain, select_series
from dicom_node.routing_admin import InvalidEntryError, check_rule, stored_rule
from dicom_node.security.crypto import load_keys

DEFAULT_STUDY_LIMIT = 20
MAX_STUDY_LIMIT = 200


@dataclass(frozen=True)
class SeriesTrial:
    """One series of a tried study: whether the rule takes it and each criterion's check.
    ``already_routed``: a job of a rule with this name exists for the series."""

    candidate: SeriesCandidate
    checks: list[CriterionCheck]
    already_routed: bool

    @property
    def matched(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[CriterionCheck]:
        return [check for check in self.checks if not check.passed]

    def as_dict(self) -> dict[str, Any]:
        candidate = self.candidate
        return {
            "series_id": candidate.series_id,
            "series_instance_uid": candidate.series_instance_uid,
            "series_number": candidate.series_number,
            "modality": candidate.modality,
            "series_description": candidate.series_description,
            "num_instances": candidate.num_instances,
            "matched": self.matched,
            "reasons": [check.reason for check in self.failed],
            "checks": [check.as_dict() for check in self.checks],
            "already_routed": self.already_routed,
        }


@dataclass(frozen=True)
class StudyTrial:
    study: Study
    series: list[SeriesTrial]

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_id": self.study.id,
            "study_instance_uid": self.study.study_instance_uid,
            "study_date": self.study.study_date,
            "status": str(self.study.status),
            "last_received_at": self.study.last_received_at.isoformat(),
            "matched_series": sum(trial.matched for trial in self.series),
            "series": [trial.as_dict() for trial in self.series],
        }


@dataclass(frozen=True)
class RuleTrial:
    """The answer: the rule tried, the studies examined (most recent first), and how
    often each criterion failed across every series (``failures``)."""

    rule: Rule
    studies: list[StudyTrial]
    notes: list[str] = field(default_factory=list)

    @property
    def series(self) -> list[SeriesTrial]:
        return [trial for study in self.studies for trial in study.series]

    def failures(self) -> dict[str, int]:
        counts = Counter(check.criterion for trial in self.series for check in trial.failed)
        return dict(counts.most_common())

    def as_dict(self) -> dict[str, Any]:
        series = self.series
        return {
            "rule_name": self.rule.name,  # not the rule: it may hold a patient's ID
            "rule_enabled": self.rule.enabled,
            "notes": self.notes,
            "studies_examined": len(self.studies),
            "series_examined": len(series),
            "series_matched": sum(trial.matched for trial in series),
            "failures": self.failures(),
            "studies": [study.as_dict() for study in self.studies],
        }


def _recent_studies(session: Session, since: dt.datetime | None, limit: int) -> list[Study]:
    query = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    return list(session.scalars(query))


def _routed_series(session: Session, rule_name: str, series_ids: list[int]) -> set[int]:
    if not series_ids:
        return set()
    rows = session.scalars(
        select(Job.series_id).where(Job.rule_name == rule_name, Job.series_id.in_(series_ids))
    )
    return set(rows)


def try_rule(
    session: Session,
    settings: Settings,
    rule: Rule,
    *,
    since: dt.datetime | None = None,
    limit: int = DEFAULT_STUDY_LIMIT,
) -> RuleTrial:
    """Check ``rule`` against every series of the ``limit`` most recent studies (received
    since ``since`` when given), reading and writing nothing but the series' headers."""
    limit = max(1, min(limit, MAX_STUDY_LIMIT))
    notes: list[str] = []
    if not rule.enabled:
        notes.append("the rule is disabled: tried as if enabled; it routes nothing until enabled")
    notes.append(
        "studies already complete are not routed again when a rule changes: the rule takes"
        " the studies that complete from now on"
    )
    tried = rule.model_copy(update={"enabled": True})
    keys = load_keys(settings.spool_encryption_key_file)
    studies: list[StudyTrial] = []
    for study in _recent_studies(session, since, limit):
        candidates = select_series(study.id, session, keys)
        routed = _routed_series(session, rule.name, [c.series_id for c in candidates])
        trials = [
            SeriesTrial(
                candidate,
                explain(tried, candidate, candidate.calling_ae_titles),
                candidate.series_id in routed,
            )
            for candidate in candidates
        ]
        studies.append(StudyTrial(study, trials))
    return RuleTrial(rule, studies, notes)


def _refusal(session: Session, settings: Settings, rule: Rule) -> str | None:
    """Why the node would refuse to store ``rule`` as it is, or None."""
    try:
        check_rule(session, rule, plugins_and_models(session, settings))
    except InvalidEntryError as exc:
        where = ".".join(str(part) for part in exc.loc)
        return f"{where}: {exc}" if where else str(exc)
    return None


def try_stored_or_given(
    session: Session,
    settings: Settings,
    rule: Rule | None,
    name: str | None,
    *,
    since: dt.datetime | None = None,
    limit: int = DEFAULT_STUDY_LIMIT,
) -> RuleTrial:
    """``try_rule`` with ``rule`` (a draft: what would keep it from being stored is a
    note) or the stored rule ``name`` (``UnknownEntryError`` if there is none)."""
    if rule is None:
        if name is None:
            raise InvalidEntryError("give a rule (a definition) or the name of a stored rule")
        rule = stored_rule(session, name)
    refusal = _refusal(session, settings, rule)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    trial = try_rule(session, settings, rule, since=since, limit=limit)
    if refusal is not None:
        trial.notes.insert(0, f"the rule would be refused as it is: {refusal}")
    return trial
