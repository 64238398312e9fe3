"""Fixtures and helpers of the resource tests (studies, jobs, exports, audit): an API on a
node's settings with a CT rule sending to "pacs", studies indexed as the receiver indexes
them, and a real dispatcher (inline executor) that makes jobs, outputs and exports."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import update

from db.enums import TokenRole
from db.models import Job
from dicom_node.api.testing import ApiHarness, api_harness, settings_for
from dicom_node.assembler import complete_quiet_studies
from dicom_node.config import Settings
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import Executor, InlineExecutor
from dicom_node.jobs.worker import JobResult, JobSpec, run_job
from dicom_node.routing_store import sync_from_settings
from dicom_node.storage import Spool
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import PACS, STUDY_UID, add_series

__all__ = ["STUDY_UID", "audit_rows"]

OTHER_STUDY_UID = "1.2.826.0.1.3680043.10.1234.2"
JANUARY = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
FEBRUARY = dt.datetime(2026, 2, 1, 9, 0, tzinfo=dt.UTC)
LATER = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
CT_RULE = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian", "median"]}


@dataclass
class Studies:
    """Two studies: ``STUDY_UID`` (a CT series from CT_SCANNER and an MR series from
    MR_SCANNER, received in January, StudyDate 2026-01-10) and ``OTHER_STUDY_UID`` (a CT
    series from CT_SCANNER, received in February, StudyDate 2026-02-01)."""

    ct: str
    mr: str
    other_ct: str


def settings_with_ct_rule(root: Path, **overrides: object) -> Settings:
    """A node's settings: the CT rule, its outputs sent to "pacs"."""
    return settings_for(
        root, destinations=[PACS], rules=[{**CT_RULE, "destinations": ["pacs"]}], **overrides
    )


@pytest.fixture
def node_settings(tmp_path: Path) -> Settings:
    return settings_with_ct_rule(tmp_path)


@pytest.fixture
def api(node_settings: Settings) -> Iterator[ApiHarness]:
    with api_harness(node_settings) as harness:
        yield harness


@pytest.fixture
def studies(api: ApiHarness, tmp_path: Path) -> Studies:
    return index_studies(api, Spool(tmp_path / "spool", fsync=False))


def index_studies(api: ApiHarness, spool: Spool) -> Studies:
    sessions = api.context.sessions

    def january(number: int, modality: str, sender: str) -> str:
        return add_series(
            spool,
            sessions,
            number=number,
            modality=modality,
            calling_ae=sender,
            received_at=JANUARY,
            study_date="20260110",
        )

    return Studies(
        ct=january(1, "CT", "CT_SCANNER"),
        mr=january(2, "MR", "MR_SCANNER"),
        other_ct=add_series(
            spool,
            sessions,
            number=3,
            calling_ae="CT_SCANNER",
            study_uid=OTHER_STUDY_UID,
            received_at=FEBRUARY,
            study_date="20260201",
        ),
    )


def dispatcher_with_jobs(
    api: ApiHarness,
    settings: Settings,
    executor: Executor | None = None,
    run: Callable[[JobSpec], JobResult] = run_job,
) -> Dispatcher:
    """Complete every study and route it: one queued job per CT series; nothing run yet."""
    sessions = api.context.sessions
    with sessions.begin() as session:
        sync_from_settings(session, settings)
        complete_quiet_studies(session, 1.0, now=LATER)
    dispatcher = Dispatcher(settings, sessions, executor or InlineExecutor(run))
    dispatcher.reload_routing(force=True)
    dispatcher.route_completed_studies()
    return dispatcher


def run_all(dispatcher: Dispatcher) -> None:
    """Run the queued jobs one after the other (the inline executor has one slot)."""
    while dispatcher.fill():
        dispatcher.collect()


def set_job_state(api: ApiHarness, job_id: int, **values: object) -> None:
    """Put a job where a test needs it, as a node's stages would have."""
    with api.context.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def get(api: ApiHarness, path: str, role: TokenRole = TokenRole.VIEWER, **params: object) -> object:
    response = api.client.get(f"/api/v1{path}", params=params, headers=api.headers(role))
    assert response.status_code == 200, response.text
    return response.json()


def post(api: ApiHarness, path: str, role: TokenRole = TokenRole.OPERATOR) -> tuple[int, object]:
    response = api.client.post(f"/api/v1{path}", headers=api.headers(role))
    return response.status_code, response.json()
