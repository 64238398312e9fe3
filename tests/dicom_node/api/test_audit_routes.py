"""/api/v1/audit: the trail with the filters of `dicom-node audit`, admin only, each read
an audit_read row."""

from __future__ import annotations

import datetime as dt
from typing import Any

from db.enums import TokenRole
from dicom_node.api.testing import ApiHarness
from dicom_node.security import audit
from dicom_node.security.audit import AuditAction
from tests.dicom_node.api.resource_support import STUDY_UID, audit_rows

WEEK_AGO = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)


def add_events(api: ApiHarness) -> None:
    """A study completed a week ago, a job run now on it, a plugin changed now."""
    node = audit.Actor.node("assembler")
    with api.context.sessions.begin() as session:
        audit.record(
            session,
            action=AuditAction.STUDY_COMPLETED,
            actor=node,
            study_instance_uid=STUDY_UID,
            at=WEEK_AGO,
        )
        audit.record(session, action=AuditAction.JOB_RAN, actor=node, study_instance_uid=STUDY_UID)
        audit.record(session, action=AuditAction.PLUGIN_CHANGED, actor=audit.Actor.os_user())


def actions(api: ApiHarness, **params: object) -> list[str]:
    response = api.client.get("/api/v1/audit", params=params, headers=api.headers(TokenRole.ADMIN))
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return [event["action"] for event in events]


def test_filters_and_each_read_is_recorded(api: ApiHarness) -> None:
    add_events(api)
    assert actions(api, study=STUDY_UID) == ["study_completed", "job_ran"]  # oldest first
    # The first read is on the study's trail too: who read it.
    assert actions(api, study=STUDY_UID, since="1d") == ["job_ran", "audit_read"]
    since = (WEEK_AGO + dt.timedelta(minutes=1)).astimezone(dt.timezone(dt.timedelta(hours=-5)))
    since = since.isoformat()  # five hours behind UTC: the same moment
    assert actions(api, since=since, action=["plugin_changed", "study_completed"]) == [
        "plugin_changed"
    ]
    assert actions(api, action="audit_read", limit=2) == ["audit_read", "audit_read"]
    reads = audit_rows(api.context.sessions, AuditAction.AUDIT_READ)
    assert [(r["actor"], r["count"], r["study_instance_uid"]) for r in reads] == [
        ("admin", 2, STUDY_UID),
        ("admin", 2, STUDY_UID),
        ("admin", 1, None),
        ("admin", 2, None),
    ]


def test_admin_only_and_bad_filters_are_422(api: ApiHarness) -> None:
    for role in (TokenRole.VIEWER, TokenRole.OPERATOR):
        assert api.client.get("/api/v1/audit", headers=api.headers(role)).status_code == 403
    headers = api.headers(TokenRole.ADMIN)
    for params, field in (
        ({"since": "yesterday"}, "since"),
        ({"since": "1000000D"}, "since"),
        ({"action": "deleted_everything"}, "action"),
        ({"limit": 0}, "limit"),
        ({"study": "1.2.x"}, "study"),
    ):
        response = api.client.get("/api/v1/audit", params=params, headers=headers)
        assert response.status_code == 422, params
        assert field in str(response.json()["detail"]), params
    assert audit_rows(api.context.sessions, AuditAction.AUDIT_READ) == []
