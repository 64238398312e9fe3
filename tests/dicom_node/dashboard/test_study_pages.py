"""The studies list, a study's timeline and the jobs page: what they show, the buttons each
role gets, and the phi_read rows they leave."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from db.enums import JobState, TokenRole
from db.models import AuditEvent, ExportState
from dicom_node.api.testing import ApiHarness
from dicom_node.security import audit
from tests.dicom_node.dashboard.dashboard_support import add_export, add_job, add_study, signed_in
from tests.dicom_node.dashboard.test_pages import table_text, text_of

T0 = dt.datetime(2030, 5, 1, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def fill(api: ApiHarness) -> tuple[str, int, int]:
    """A CT study with a failed and a succeeded job (one export delivered), an MR study."""
    with api.context.sessions.begin() as session:
        ct = add_study(session, [at(0), at(5)], completed_at=at(10))
        failed = add_job(
            session,
            ct,
            JobState.FAILED,
            rule="lungs",
            error="model file not found",
            finished_at=at(12),
        )
        done = add_job(session, ct, JobState.SUCCEEDED, finished_at=at(13))
        done.started_at = at(11)
        done.num_outputs = 1
        add_export(session, done, ExportState.DELIVERED, delivered_at=at(20))
        add_study(session, [at(30)], modality="MR")
        return ct.study_instance_uid, failed.id, done.id


def test_the_studies_page_lists_and_filters_studies(api: ApiHarness) -> None:
    ct_uid, _, _ = fill(api)
    client = signed_in(api, TokenRole.VIEWER)
    everything = table_text(client.get("/studies").text, "studies")
    assert ct_uid in everything and "MR" in everything and "CT" in everything
    assert f"{ct_uid} complete CT 1 2" in everything
    only_mr = table_text(client.get("/studies?modality=MR").text, "studies")
    assert ct_uid not in only_mr and "MR" in only_mr
    only_complete = table_text(client.get("/studies?status=complete").text, "studies")
    assert ct_uid in only_complete and "MR" not in only_complete


def test_a_study_page_shows_its_timeline_in_order(api: ApiHarness) -> None:
    ct_uid, failed_id, done_id = fill(api)
    response = signed_in(api, TokenRole.VIEWER).get(f"/studies/{ct_uid}")
    assert response.status_code == 200
    timeline = text_of(response.text.split('id="timeline"', 1)[1].split("</ol>", 1)[0])
    expected_in_order = [
        "first instance received",
        "last instance received 2 instances in 1 series",
        f"job {done_id} (ct-default) started",
        f"job {done_id} (ct-default) step gaussian",
        f"job {failed_id} (lungs) failed model file not found",
        f"job {done_id} (ct-default) succeeded 1 outputs",
        f"export 1 to pacs (job {done_id}) delivered",
    ]
    positions = [timeline.index(line) for line in expected_in_order]
    assert positions == sorted(positions), timeline
    assert "0.50 s job" in timeline  # a step shows its duration, not a time it was not given
    missing = signed_in(api, TokenRole.VIEWER).get("/studies/1.2.3.999")
    assert missing.status_code == 404


def test_retry_and_cancel_buttons_are_shown_by_role(api: ApiHarness) -> None:
    _, failed_id, _ = fill(api)
    with api.context.sessions.begin() as session:
        study = add_study(session, [at(40)])
        queued = add_job(session, study, JobState.QUEUED).id
    viewer = signed_in(api, TokenRole.VIEWER).get("/jobs").text
    assert "model file not found" in viewer
    assert "data-api-url" not in viewer
    operator = signed_in(api, TokenRole.OPERATOR).get("/jobs").text
    assert f'data-api-url="/api/v1/jobs/{failed_id}/retry"' in operator
    assert f'data-api-url="/api/v1/jobs/{queued}/cancel"' in operator
    assert f'data-api-url="/api/v1/jobs/{queued}/retry"' not in operator
    only_failed = signed_in(api, TokenRole.ADMIN).get("/jobs?state=failed").text
    assert f'id="job-{failed_id}"' in only_failed and f'id="job-{queued}"' not in only_failed


def test_each_view_of_patient_data_is_audited(api: ApiHarness) -> None:
    ct_uid, _, _ = fill(api)
    client = signed_in(api, TokenRole.VIEWER)
    for path in ("/studies", f"/studies/{ct_uid}", "/jobs"):
        assert client.get(path).status_code == 200
    with api.context.sessions() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action == audit.AuditAction.PHI_READ)
        ).all()
    assert [(row.actor, row.object_id, row.count) for row in rows] == [
        ("viewer", "GET /studies", 2),
        ("viewer", f"GET /studies/{ct_uid}", 1),
        ("viewer", "GET /jobs", 2),
    ]
