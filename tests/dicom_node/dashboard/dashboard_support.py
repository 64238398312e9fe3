"""Rows for the dashboard tests: a study with instances received at given times, a failed
job, a job whose outputs were delivered, a failed export; and a signed-in test client."""

from __future__ import annotations

import datetime as dt
import itertools

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from db.enums import JobState, TokenRole
from db.models import (
    Export,
    ExportState,
    Instance,
    Job,
    Series,
    Study,
    StudyStatus,
)
from dicom_node.api.auth import CSRF_COOKIE
from dicom_node.api.testing import ApiHarness
from tests.dicom_node.export.export_support import output_and_export

_numbers = itertools.count(1)


def uid(prefix: str = "1.2.826.0.1.3680043.10.1") -> str:
    return f"{prefix}.{next(_numbers)}"


def add_study(
    session: Session,
    received: list[dt.datetime],
    *,
    completed_at: dt.datetime | None = None,
    modality: str = "CT",
) -> Study:
    """A study of one series with an instance received at each of ``received``."""
    study = Study(
        study_instance_uid=uid(),
        status=StudyStatus.COMPLETE if completed_at else StudyStatus.RECEIVING,
        first_received_at=min(received),
        last_received_at=max(received),
        completed_at=completed_at,
    )
    series = Series(series_instance_uid=uid(), study=study, modality=modality, series_number=1)
    session.add_all([study, series])
    for index, moment in enumerate(received):
        session.add(
            Instance(
                sop_instance_uid=uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                series=series,
                instance_number=index + 1,
                path=f"/spool/{index}.dcm",
                size_bytes=1000,
                received_at=moment,
            )
        )
    session.flush()
    return study


def add_job(
    session: Session,
    study: Study,
    state: JobState,
    *,
    rule: str = "ct-default",
    error: str | None = None,
    finished_at: dt.datetime | None = None,
) -> Job:
    series = study.series[0]
    job = Job(
        study_id=study.id,
        series_id=series.id,
        series_instance_uid=series.series_instance_uid,
        rule_name=rule,
        pipeline=["gaussian"],
        params={},
        destinations=["pacs"],
        state=state,
        attempts=1,
        max_attempts=1,
        not_before=study.last_received_at,
        error=error,
        step_timings=[{"step": "gaussian", "seconds": 0.5}],
        started_at=finished_at,
        finished_at=finished_at,
    )
    session.add(job)
    session.flush()
    return job


def add_export(
    session: Session,
    job: Job,
    state: ExportState,
    *,
    delivered_at: dt.datetime | None = None,
    error: str | None = None,
) -> Export:
    return output_and_export(
        session,
        job,
        state,
        next_attempt_at=delivered_at or job.finished_at or job.not_before,
        last_error=error,
        delivered_at=delivered_at,
    )


def signed_in(api: ApiHarness, role: TokenRole) -> TestClient:
    """The harness's client, signed in through the form with the token of ``role``."""
    client = api.client
    client.cookies.clear()
    form = client.get("/sign-in")
    response = client.post(
        "/sign-in",
        data={"token": api.tokens[role], "csrf_token": form.cookies[CSRF_COOKIE], "next": "/"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return client
