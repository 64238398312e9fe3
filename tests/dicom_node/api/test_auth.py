"""Bearer tokens on every /api/v1 route: 401 without one or with a bad one, 403 for a role
too low, each refusal in the audit trail without the token."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.enums import TokenRole
from db.models import AuditEvent
from dicom_node.api.app import create_app
from dicom_node.api.auth import AdminCaller
from dicom_node.api.testing import ApiHarness
from dicom_node.api.tokens import revoke
from dicom_node.security.audit import Actor, AuditAction, AuditObjectKind

probe = APIRouter()


@probe.get("/probe/admin")
def admin_only(caller: AdminCaller) -> dict[str, str]:
    return {"name": caller.token.name, "role": str(caller.role)}


def probe_client(api: ApiHarness) -> TestClient:
    app = create_app(api.context)
    app.include_router(probe)
    return TestClient(app)


def denials(api: ApiHarness) -> list[AuditEvent]:
    with api.context.sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.action == AuditAction.ACCESS_DENIED)
            )
        )


def test_admin_is_let_in_with_its_name(api: ApiHarness) -> None:
    response = probe_client(api).get("/probe/admin", headers=api.headers(TokenRole.ADMIN))
    assert response.status_code == 200
    assert response.json() == {"name": "admin", "role": "admin"}
    assert denials(api) == []


def test_no_token_bad_token_revoked_token_are_401_and_audited(api: ApiHarness) -> None:
    client = probe_client(api)
    with api.context.sessions.begin() as session:
        revoke(session, "operator", Actor.os_user())
    attempts = [
        {},
        {"Authorization": "Bearer dn_not-a-token"},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        api.headers(TokenRole.OPERATOR),  # revoked above
    ]
    for headers in attempts:
        response = client.get("/probe/admin", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["detail"]
    rows = denials(api)
    assert len(rows) == len(attempts)
    for row in rows:
        assert row.object_kind == AuditObjectKind.REQUEST
        assert row.object_id == "GET /probe/admin"
        assert row.actor_address and row.actor_address.startswith("testclient")
        assert api.tokens[TokenRole.OPERATOR] not in str(row.__dict__)


def test_a_role_too_low_is_403_naming_the_role_needed(api: ApiHarness) -> None:
    client = probe_client(api)
    for role in (TokenRole.VIEWER, TokenRole.OPERATOR):
        response = client.get("/probe/admin", headers=api.headers(role))
        assert response.status_code == 403
        assert "admin" in response.json()["detail"]
    rows = denials(api)
    assert [row.actor for row in rows] == ["viewer", "operator"]


def test_openapi_declares_the_bearer_scheme(api: ApiHarness) -> None:
    document = probe_client(api).get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert any(scheme.get("scheme") == "bearer" for scheme in schemes.values())
