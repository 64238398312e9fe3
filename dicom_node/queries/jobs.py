"""Jobs as people read them: a search by state, rule, processor and study, and one job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Select, String, cast, select
from sqlalchemy.orm import Session

from db.models import Job, JobState, Study
from dicom_node.jobs.state import job_as_dict
from dicom_node.queries.paging import Page, Paging, UtcDateTime, count_of


class StepTiming(BaseModel):
    """How long one step of the job's last run took (``load``, ``gaussian:run``...)."""

    step: str
    seconds: float


class JobView(BaseModel):
    """A job: one rule's pipeline on one series, its state and its last run."""

    id: int
    study_id: int
    study_instance_uid: str
    series_instance_uid: str
    rule: str
    pipeline: list[str]
    state: JobState
    attempts: int = Field(ge=0)
    max_attempts: int = Field(ge=0)
    error: str | None
    worker: str | None = Field(description="The executor's worker that ran it last.")
    claimed_by: str | None = Field(description="The node that runs (or ran) it.")
    rerun_requested: bool = Field(
        description="Its study completed again while it ran: it runs again when this run ends."
    )
    outputs: int = Field(ge=0, description="How many DICOM objects its last run produced.")
    destinations: list[str]
    step_timings: list[StepTiming]
    created_at: UtcDateTime | None
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None


@dataclass(frozen=True)
class JobFilters:
    """Which jobs: in ``state``, of ``rule``, whose pipeline has ``processor``, of the study
    ``study_instance_uid``; the newest first unless ``newest_first`` is False."""

    state: JobState | None = None
    rule: str | None = None
    processor: str | None = None
    study_instance_uid: str | None = None
    newest_first: bool = True

    def conditions(self) -> list[Any]:
        found: list[Any] = []
        if self.state is not None:
            found.append(Job.state == self.state)
        if self.rule is not None:
            found.append(Job.rule_name == self.rule)
        if self.processor is not None:  # the JSON list's text holds the quoted name
            quoted = f'"{self.processor}"'
            found.append(cast(Job.pipeline, String).contains(quoted, autoescape=True))
        if self.study_instance_uid is not None:
            found.append(Study.study_instance_uid == self.study_instance_uid)
        return found


def _view(job: Job, study_instance_uid: str) -> JobView:
    return JobView.model_validate({**job_as_dict(job), "study_instance_uid": study_instance_uid})


def _with_study() -> Select[Job, str]:
    return select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)


def search_jobs(session: Session, filters: JobFilters, paging: Paging) -> Page[JobView]:
    matching = _with_study().where(*filters.conditions())
    order = Job.id.desc() if filters.newest_first else Job.id
    rows = session.execute(paging.apply(matching.order_by(order)))
    return Page[JobView](
        items=[_view(job, uid) for job, uid in rows],
        total=count_of(session, matching.with_only_columns(Job.id)),
        limit=paging.limit,
        offset=paging.offset,
    )


def job_view(session: Session, job_id: int) -> JobView | None:
    """The job as it is now (read again, whatever the session held)."""
    statement = _with_study().where(Job.id == job_id)
    row = session.execute(statement.execution_options(populate_existing=True)).one_or_none()
    return None if row is None else _view(row[0], row[1])
