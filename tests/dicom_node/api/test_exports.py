"""/api/v1/exports: search, read, retry and cancel the exports of a real dispatcher's jobs."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update

from db.enums import TokenRole
from db.models import Export, ExportState
from dicom_node.api.testing import ApiHarness
from dicom_node.config import Settings
from dicom_node.export.queue import claim
from dicom_node.security.audit import AuditAction
from tests.dicom_node.api.resource_support import (
    STUDY_UID,
    Studies,
    api,
    audit_rows,
    dispatcher_with_jobs,
    get,
    node_settings,
    post,
    run_all,
    studies,
)

__all__ = ["api", "node_settings", "studies"]

SOON = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def exports_by_study(api: ApiHarness) -> tuple[list[int], list[int]]:
    """The ids of the exports of ``STUDY_UID``'s outputs, and of the other study's."""
    ours = get(api, "/exports", study=STUDY_UID, limit=1000)
    with api.context.sessions() as session:
        every = list(session.scalars(select(Export.id).order_by(Export.id)))
    mine = sorted(item["id"] for item in ours["items"])  # type: ignore[index]
    return mine, [export_id for export_id in every if export_id not in mine]


def set_state(api: ApiHarness, export_id: int, state: ExportState) -> None:
    with api.context.sessions.begin() as session:
        session.execute(update(Export).where(Export.id == export_id).values(state=state))


def test_search_and_read_exports(
    api: ApiHarness, studies: Studies, node_settings: Settings
) -> None:
    run_all(dispatcher_with_jobs(api, node_settings))
    mine, others = exports_by_study(api)
    assert len(mine) == len(others) == 8  # each study's CT series: 4 slices, 2 steps
    set_state(api, mine[0], ExportState.FAILED)
    searches: list[tuple[dict[str, object], list[int]]] = [
        ({"state": "failed"}, [mine[0]]),
        ({"state": "pending", "study": STUDY_UID}, sorted(mine[1:], reverse=True)),
        ({"destination": "pacs", "limit": 2}, sorted(mine + others, reverse=True)[:2]),
        ({"destination": "archive"}, []),
        ({"offset": 15}, [min(mine + others)]),
    ]
    for params, expected in searches:
        page: Any = get(api, "/exports", **params)
        assert [item["id"] for item in page["items"]] == expected, params
    export: Any = get(api, f"/exports/{mine[0]}")
    assert (export["state"], export["destination"], export["attempts"]) == ("failed", "pacs", 0)
    assert export["output_id"] is not None
    headers = api.headers(TokenRole.VIEWER)
    assert api.client.get("/api/v1/exports/999", headers=headers).status_code == 404
    for bad in ({"state": "lost"}, {"study": "1..2"}, {"offset": -1}):
        assert api.client.get("/api/v1/exports", params=bad, headers=headers).status_code == 422


def test_cancel_and_retry_exports(
    api: ApiHarness, studies: Studies, node_settings: Settings
) -> None:
    run_all(dispatcher_with_jobs(api, node_settings))
    mine, _ = exports_by_study(api)
    wakes: list[str] = []
    api.context.wake_exporter = lambda: wakes.append("exporter")
    assert post(api, f"/exports/{mine[0]}/cancel", TokenRole.VIEWER)[0] == 403
    status, export = post(api, f"/exports/{mine[0]}/cancel")
    assert (status, export["state"]) == (200, "cancelled")  # type: ignore[index]
    claimed = claim(api.context.sessions, ["pacs"], SOON, 100, None)
    assert mine[0] not in {c.id for c in claimed} and len(claimed) == 15
    [asked] = audit_rows(api.context.sessions, AuditAction.CANCEL_REQUESTED)
    assert (asked["actor"], asked["object_id"], asked["study_instance_uid"]) == (
        "operator",
        str(mine[0]),
        STUDY_UID,
    )
    status, refused = post(api, f"/exports/{mine[1]}/cancel")  # claimed: being sent
    assert status == 409
    assert refused == {
        "detail": f"export {mine[1]} is sending; only a pending or failed export can be cancelled"
    }
    assert post(api, f"/exports/{mine[1]}/retry")[0] == 409
    assert wakes == []
    status, export = post(api, f"/exports/{mine[0]}/retry")
    assert (status, export["state"], wakes) == (200, "pending", ["exporter"])  # type: ignore[index]
    [retried] = audit_rows(api.context.sessions, AuditAction.RETRY_REQUESTED)
    assert (retried["actor"], retried["object_id"]) == ("operator", str(mine[0]))
    assert post(api, "/exports/999/cancel")[0] == 404
    assert post(api, "/exports/999/retry")[0] == 404
