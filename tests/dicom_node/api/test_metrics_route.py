"""GET /metrics: a viewer's token unless ``metrics_public``; the text format (or OpenMetrics
when asked); queue depths read from the database at each scrape."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from db.enums import AuditAction, TokenRole
from db.models import AuditEvent, Study, StudyStatus
from dicom_node.api.testing import ApiHarness, api_harness, settings_for


def _queue_depths(text: str) -> dict[str, float]:
    return {
        sample.labels["queue"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "dicom_node_queue_depth"
        for sample in family.samples
    }


def _denials(api: ApiHarness) -> int:
    with api.context.sessions() as session:
        query = select(func.count()).where(AuditEvent.action == AuditAction.ACCESS_DENIED)
        return int(session.scalar(query) or 0)


def test_metrics_take_a_viewer_token_and_refusals_are_audited(api: ApiHarness) -> None:
    before = _denials(api)
    assert api.client.get("/metrics").status_code == 401
    bad = api.client.get("/metrics", headers={"Authorization": "Bearer dn_not-a-token"})
    assert bad.status_code == 401
    assert _denials(api) == before + 2
    response = api.client.get("/metrics", headers=api.headers(TokenRole.VIEWER))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {
        "dicom_node_instances_received",
        "dicom_node_bytes_received",
        "dicom_node_associations",
        "dicom_node_jobs",
        "dicom_node_job_duration_seconds",
        "dicom_node_processor_duration_seconds",
        "dicom_node_exports",
        "dicom_node_queue_depth",
        "dicom_node_study_turnaround_seconds",
    } <= names


def test_metrics_public_lets_a_scraper_in_without_a_token(tmp_path: Path) -> None:
    with api_harness(settings_for(tmp_path, metrics_public=True)) as api:
        response = api.client.get("/metrics")
        assert response.status_code == 200
        assert "dicom_node_queue_depth" in response.text
        assert api.client.get("/healthz").status_code == 200


def test_queue_depths_are_read_from_the_database_at_each_scrape(api: ApiHarness) -> None:
    headers = api.headers(TokenRole.VIEWER)
    first = _queue_depths(api.client.get("/metrics", headers=headers).text)
    assert first == {
        "jobs": 0,
        "jobs_running": 0,
        "exports": 0,
        "exports_sending": 0,
        "studies_receiving": 0,
    }
    now = dt.datetime.now(dt.UTC)
    with api.context.sessions.begin() as session:
        for number, status in enumerate((StudyStatus.RECEIVING,) * 2 + (StudyStatus.COMPLETE,)):
            session.add(
                Study(
                    study_instance_uid=f"1.2.826.0.1.3680043.10.543.{number}",
                    status=status,
                    first_received_at=now,
                    last_received_at=now,
                )
            )
    second = _queue_depths(api.client.get("/metrics", headers=headers).text)
    assert second["studies_receiving"] == 2


def test_a_scraper_that_asks_for_openmetrics_gets_it(api: ApiHarness) -> None:
    response = api.client.get(
        "/metrics",
        headers={**api.headers(TokenRole.VIEWER), "Accept": "application/openmetrics-text"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
