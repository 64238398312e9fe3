"""Bearer tokens on every /api/v1 route: 401 without one or with a bad one, 403 for a role
too low, each refusal in the audit trail without the token. The dashboard's cookie instead
of a bearer token, with the CSRF header on changes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.enums import TokenRole
from db.models import AuditEvent
from dicom_node.api.app import create_app
from dicom_node.api.auth import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, AdminCaller
from dicom_node.api.testing import ApiHarness
from dicom_node.api.tokens import revoke
from dicom_node.security.audit import Actor, AuditAction, AuditObjectKind

probe = APIRouter()


@probe.get("/probe/admin")
def admin_only(caller: AdminCaller) -> dict[str, str]:
    return {"name": caller.token.name, "role": str(caller.role)}


@probe.post("/probe/admin")
def admin_change(caller: AdminCaller) -> dict[str, str]:
    return {"name": caller.token.name, "changed": "yes"}


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


def test_the_dashboard_cookie_authenticates_reads(api: ApiHarness) -> None:
    client = probe_client(api)
    client.cookies.set(SESSION_COOKIE, api.tokens[TokenRole.ADMIN])
    assert client.get("/probe/admin").json() == {"name": "admin", "role": "admin"}
    client.cookies.set(SESSION_COOKIE, api.tokens[TokenRole.VIEWER])
    assert client.get("/probe/admin").status_code == 403
    client.cookies.set(SESSION_COOKIE, "dn_not-a-token")
    assert client.get("/probe/admin").status_code == 401


def test_a_change_with_the_cookie_needs_the_matching_csrf_header(api: ApiHarness) -> None:
    client = probe_client(api)
    client.cookies.set(SESSION_COOKIE, api.tokens[TokenRole.ADMIN])
    client.cookies.set(CSRF_COOKIE, "page-secret")
    for headers in ({}, {CSRF_HEADER: "guessed"}):
        response = client.post("/probe/admin", headers=headers)
        assert response.status_code == 403, headers
        assert CSRF_HEADER in response.json()["detail"]
    client.cookies.delete(CSRF_COOKIE)  # a header alone, without its cookie, proves nothing
    assert client.post("/probe/admin", headers={CSRF_HEADER: ""}).status_code == 403
    client.cookies.set(CSRF_COOKIE, "page-secret")
    response = client.post("/probe/admin", headers={CSRF_HEADER: "page-secret"})
    assert response.json() == {"name": "admin", "changed": "yes"}
    rows = denials(api)
    assert len(rows) == 3
    assert {row.object_id for row in rows} == {"POST /probe/admin"}
    assert all(api.tokens[TokenRole.ADMIN] not in str(row.__dict__) for row in rows)


def test_bearer_requests_need_no_csrf_header_and_win_over_the_cookie(api: ApiHarness) -> None:
    client = probe_client(api)
    client.cookies.set(SESSION_COOKIE, api.tokens[TokenRole.ADMIN])
    response = client.post("/probe/admin", headers=api.headers(TokenRole.OPERATOR))
    assert response.status_code == 403  # the bearer token's role, not the cookie's
    client.cookies.clear()
    response = client.post("/probe/admin", headers=api.headers(TokenRole.ADMIN))
    assert response.json() == {"name": "admin", "changed": "yes"}
    basic = client.post("/probe/admin", headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
    assert basic.status_code == 401
