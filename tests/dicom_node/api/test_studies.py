"""/api/v1/studies and /series: search with every filter and paging, a study's detail with
its jobs, outputs and exports, a series' instances; each read a phi_read row."""

from __future__ import annotations

from typing import Any

from db.enums import TokenRole
from dicom_node.api.testing import ApiHarness
from dicom_node.config import Settings
from dicom_node.security.audit import AuditAction
from tests.dicom_node.api.resource_support import (
    OTHER_STUDY_UID,
    STUDY_UID,
    Studies,
    api,
    audit_rows,
    dispatcher_with_jobs,
    get,
    node_settings,
    run_all,
    studies,
)

__all__ = ["api", "node_settings", "studies"]


def uids(page: Any) -> list[str]:
    return [item["study_instance_uid"] for item in page["items"]]


SEARCHES: list[tuple[dict[str, str], list[str]]] = [
    ({}, [OTHER_STUDY_UID, STUDY_UID]),  # the newest first
    ({"received_from": "2026-01-20T00:00:00Z"}, [OTHER_STUDY_UID]),
    ({"received_to": "2026-01-20T00:00:00+00:00"}, [STUDY_UID]),
    ({"received_to": "2026-01-15T10:30:00+01:00"}, []),  # 09:30 UTC: before it came
    ({"received_to": "2026-01-15T10:30:00-01:00"}, [STUDY_UID]),
    ({"study_date_from": "2026-01-01", "study_date_to": "2026-01-31"}, [STUDY_UID]),
    ({"study_date_from": "2026-02-01"}, [OTHER_STUDY_UID]),
    ({"modality": "MR"}, [STUDY_UID]),
    ({"modality": "CT"}, [OTHER_STUDY_UID, STUDY_UID]),
    ({"calling_ae_title": "MR_SCANNER"}, [STUDY_UID]),
    ({"calling_ae_title": "NOBODY"}, []),
    ({"status": "complete"}, []),
    ({"status": "receiving", "modality": "CT"}, [OTHER_STUDY_UID, STUDY_UID]),
]


def test_search_filters(api: ApiHarness, studies: Studies) -> None:
    for params, expected in SEARCHES:
        page = get(api, "/studies", **params)
        assert (uids(page), page["total"]) == (expected, len(expected)), params  # type: ignore[index]


def test_search_pages_in_a_stable_order_and_each_read_is_audited(
    api: ApiHarness, studies: Studies
) -> None:
    first = get(api, "/studies", limit=1)
    second = get(api, "/studies", limit=1, offset=1)
    assert (uids(first), uids(second)) == ([OTHER_STUDY_UID], [STUDY_UID])
    assert first["total"] == second["total"] == 2  # type: ignore[index]
    [summary] = second["items"]  # type: ignore[index]
    assert summary["num_series"] == 2 and summary["num_instances"] == 8
    assert summary["modalities"] == ["CT", "MR"]
    assert summary["calling_ae_titles"] == ["CT_SCANNER", "MR_SCANNER"]
    assert summary["study_date"] == "20260110"
    assert summary["first_received_at"] == "2026-01-15T10:00:00Z"
    reads = audit_rows(api.context.sessions, AuditAction.PHI_READ)
    assert [(r["actor_kind"], r["actor"], r["object_id"], r["count"]) for r in reads] == [
        ("api_token", "viewer", "GET /api/v1/studies", 1),
        ("api_token", "viewer", "GET /api/v1/studies", 1),
    ]


BAD_FILTERS: list[tuple[dict[str, object], str]] = [
    ({"received_from": "2026-02-01T00:00Z", "received_to": "2026-01-01T00:00Z"}, "received"),
    ({"study_date_from": "2026-02-01", "study_date_to": "2026-01-01"}, "study_date"),
    ({"study_date_from": "20260201"}, "study_date_from"),
    ({"study_date_to": "0"}, "study_date_to"),
    ({"received_from": "1700000000"}, "received_from"),
    ({"status": "lost"}, "status"),
    ({"limit": 0}, "limit"),
    ({"limit": 5000}, "limit"),
    ({"offset": -1}, "offset"),
    ({"offset": 2**63}, "offset"),
    ({"modality": "X" * 17}, "modality"),
]


def test_bad_filters_are_422_naming_the_parameter(api: ApiHarness) -> None:
    for params, field in BAD_FILTERS:
        response = api.client.get(
            "/api/v1/studies", params=params, headers=api.headers(TokenRole.VIEWER)
        )
        assert response.status_code == 422, params
        assert field in str(response.json()["detail"]), params


def test_a_study_with_its_series_jobs_outputs_and_exports(
    api: ApiHarness, studies: Studies, node_settings: Settings
) -> None:
    run_all(dispatcher_with_jobs(api, node_settings))
    detail: Any = get(api, f"/studies/{STUDY_UID}")
    assert detail["status"] == "complete" and detail["completed_at"] is not None
    series = [
        (s["series_instance_uid"], s["modality"], s["num_instances"]) for s in detail["series"]
    ]
    assert series == [(studies.ct, "CT", 4), (studies.mr, "MR", 4)]
    [job] = detail["jobs"]  # the CT rule: the CT series only
    assert (job["series_instance_uid"], job["rule"]) == (studies.ct, "ct")
    assert job["state"] == "succeeded", job["error"]
    assert job["study_instance_uid"] == STUDY_UID
    assert {t["step"] for t in job["step_timings"]} >= {"load", "gaussian:run"}
    assert len(detail["outputs"]) == job["outputs"] == 8  # 4 slices, 2 steps
    assert {o["source_series_uid"] for o in detail["outputs"]} == {studies.ct}
    assert {o["job_id"] for o in detail["outputs"]} == {job["id"]}
    assert sorted(e["output_id"] for e in detail["exports"]) == sorted(
        o["id"] for o in detail["outputs"]
    )
    assert {(e["destination"], e["state"]) for e in detail["exports"]} == {("pacs", "pending")}
    [read] = audit_rows(api.context.sessions, AuditAction.PHI_READ)
    assert (read["study_instance_uid"], read["count"]) == (STUDY_UID, 1)


def test_a_series_with_its_instances(api: ApiHarness, studies: Studies) -> None:
    detail: Any = get(api, f"/series/{studies.mr}")
    assert (detail["study_instance_uid"], detail["modality"]) == (STUDY_UID, "MR")
    assert [i["instance_number"] for i in detail["instances"]] == [1, 2, 3, 4]
    assert detail["sop_class_uids"] == ["1.2.840.10008.5.1.4.1.1.4"]  # MR Image Storage
    assert detail["transfer_syntax_uids"] == sorted(
        {i["transfer_syntax_uid"] for i in detail["instances"]}
    )
    assert len(detail["transfer_syntax_uids"]) == 1
    [read] = audit_rows(api.context.sessions, AuditAction.PHI_READ)
    assert read["series_instance_uid"] == studies.mr


def test_unknown_uids_are_404_and_garbage_422(api: ApiHarness) -> None:
    headers = api.headers(TokenRole.VIEWER)
    for kind in ("studies", "series"):
        missing = api.client.get(f"/api/v1/{kind}/1.2.3.4", headers=headers)
        assert missing.status_code == 404 and "1.2.3.4" in missing.json()["detail"]
        bad = api.client.get(f"/api/v1/{kind}/not-a-uid", headers=headers)
        assert bad.status_code == 422
    assert audit_rows(api.context.sessions, AuditAction.PHI_READ) == []
