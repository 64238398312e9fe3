"""The overview and the audit page, as a signed-in browser gets them."""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import select

from db.enums import JobState, TokenRole
from db.models import AuditEvent, ExportState
from dicom_node.api.testing import ApiHarness
from dicom_node.security import audit
from tests.dicom_node.dashboard.dashboard_support import add_export, add_job, add_study, signed_in


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def table_text(html: str, table_id: str) -> str:
    return text_of(html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0])


def test_the_overview_shows_what_the_database_holds(api: ApiHarness) -> None:
    now = audit.utcnow()
    with api.context.sessions.begin() as session:
        study = add_study(
            session,
            [now - dt.timedelta(minutes=3)] * 4,
            completed_at=now - dt.timedelta(minutes=2),
        )
        done = add_job(session, study, JobState.SUCCEEDED, finished_at=now)
        add_export(session, done, ExportState.DELIVERED, delivered_at=now)
        add_job(session, study, JobState.FAILED, rule="lungs", error="model file not found: x")
    response = signed_in(api, TokenRole.VIEWER).get("/?hours=1")
    assert response.status_code == 200
    text = text_of(response.text)
    assert "4 instances received" in text
    assert "1 studies completed" in text
    assert "3.0 min median turnaround (1 studies" in text
    assert "model file not found: x" in text and "lungs" in text
    assert response.text.count('class="bar"') == 120  # two charts of 60 buckets
    assert "Content-Security-Policy" in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert 'src="/static/dashboard.js"' in response.text


def test_the_static_files_are_served_by_the_node(api: ApiHarness) -> None:
    for path, kind in (("/static/dashboard.js", "javascript"), ("/static/dashboard.css", "css")):
        response = api.client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_the_audit_page_lists_events_and_records_that_it_was_read(api: ApiHarness) -> None:
    with api.context.sessions.begin() as session:
        study = add_study(session, [audit.utcnow()])
        audit.record(
            session,
            action=audit.AuditAction.STUDY_COMPLETED,
            actor=audit.Actor.node("assembler"),
            study_instance_uid=study.study_instance_uid,
            count=1,
        )
    client = signed_in(api, TokenRole.ADMIN)
    everything = table_text(client.get("/audit").text, "audit-events")
    assert "study_completed" in everything and study.study_instance_uid in everything
    assert "token_changed" in everything  # the harness's tokens
    filtered = table_text(client.get("/audit?action=study_completed").text, "audit-events")
    assert "study_completed" in filtered and "token_changed" not in filtered
    other_study = table_text(client.get("/audit?study=1.2.3.4").text, "audit-events")
    assert study.study_instance_uid not in other_study
    with api.context.sessions() as session:
        reads = session.scalars(
            select(AuditEvent).where(AuditEvent.action == audit.AuditAction.AUDIT_READ)
        ).all()
    assert [(row.actor, row.object_id) for row in reads] == [("admin", "GET /audit")] * 3


def test_every_role_sees_the_pages_it_may_use(api: ApiHarness) -> None:
    for role in TokenRole:
        client = signed_in(api, role)
        html = client.get("/").text
        for path in ("/studies", "/jobs", "/rules", "/plugins"):
            assert f'href="{path}"' in html, (role, path)
        assert f"{role} ({role})" in html
        audit_linked = 'href="/audit"' in html
        assert audit_linked == (role == TokenRole.ADMIN), role
        assert client.get("/audit").status_code == (200 if audit_linked else 403)
    with api.context.sessions() as session:
        refused = session.scalars(
            select(AuditEvent).where(AuditEvent.action == audit.AuditAction.ACCESS_DENIED)
        ).all()
    assert [(row.actor, row.object_id) for row in refused] == [
        ("viewer", "GET /audit"),
        ("operator", "GET /audit"),
    ]
