"""Signing in and out of the dashboard: the cookies it sets, a refused token audited, pages
that send a signed-out browser to the form and back."""

from __future__ import annotations

from sqlalchemy import select

from db.enums import TokenRole
from db.models import AuditEvent
from dicom_node.api.auth import CSRF_COOKIE, SESSION_COOKIE
from dicom_node.api.testing import ApiHarness
from dicom_node.api.tokens import revoke
from dicom_node.dashboard.session import safe_next
from dicom_node.security.audit import Actor, AuditAction
from tests.dicom_node.dashboard.dashboard_support import signed_in


def set_cookie_headers(response: object) -> dict[str, str]:
    headers = response.headers.get_list("set-cookie")  # type: ignore[attr-defined]
    return {header.split("=", 1)[0]: header.lower() for header in headers}


def test_a_page_sends_a_signed_out_browser_to_the_form_and_back(api: ApiHarness) -> None:
    response = api.client.get("/jobs", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in?next=/jobs"
    form = api.client.get("/sign-in?next=/jobs")
    assert 'name="next" value="/jobs"' in form.text
    response = api.client.post(
        "/sign-in",
        data={
            "token": api.tokens[TokenRole.VIEWER],
            "csrf_token": form.cookies[CSRF_COOKIE],
            "next": "/jobs",
        },
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/jobs"
    cookies = set_cookie_headers(response)
    session_cookie = cookies[SESSION_COOKIE]
    assert "httponly" in session_cookie and "samesite=strict" in session_cookie
    assert "max-age" not in session_cookie  # gone when the browser closes
    assert "httponly" in cookies[CSRF_COOKIE] and "samesite=strict" in cookies[CSRF_COOKIE]
    assert response.cookies[CSRF_COOKIE] != form.cookies[CSRF_COOKIE]  # a new one per session
    page = api.client.get("/jobs")
    assert page.status_code == 200
    assert "viewer (viewer)" in page.text


def test_a_bad_or_revoked_token_is_refused_and_audited(api: ApiHarness) -> None:
    with api.context.sessions.begin() as session:
        revoke(session, "operator", Actor.os_user())
    for token in ("dn_not-a-token", api.tokens[TokenRole.OPERATOR]):
        api.client.get("/sign-in")
        response = api.client.post(
            "/sign-in",
            data={"token": token, "csrf_token": api.client.cookies[CSRF_COOKIE]},
            follow_redirects=False,
        )
        assert response.status_code == 401
        assert "unknown or revoked" in response.text
        assert SESSION_COOKIE not in response.cookies
    with api.context.sessions() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action == AuditAction.ACCESS_DENIED)
        ).all()
    assert [row.object_id for row in rows] == ["POST /sign-in"] * 2
    assert all(api.tokens[TokenRole.OPERATOR] not in str(row.__dict__) for row in rows)


def test_a_sign_in_posted_from_elsewhere_is_refused(api: ApiHarness) -> None:
    response = api.client.post(
        "/sign-in", data={"token": api.tokens[TokenRole.ADMIN]}, follow_redirects=False
    )
    assert response.status_code == 403
    assert SESSION_COOKIE not in response.cookies


def test_sign_out_clears_the_cookies_and_needs_the_page_token(api: ApiHarness) -> None:
    client = signed_in(api, TokenRole.ADMIN)
    refused = client.post("/sign-out", data={"csrf_token": "forged"}, follow_redirects=False)
    assert refused.status_code == 403
    assert client.get("/", follow_redirects=False).status_code == 200
    response = client.post(
        "/sign-out", data={"csrf_token": client.cookies[CSRF_COOKIE]}, follow_redirects=False
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in"
    cookies = set_cookie_headers(response)
    assert "max-age=0" in cookies[SESSION_COOKIE] and "max-age=0" in cookies[CSRF_COOKIE]
    client.cookies.clear()
    assert client.get("/", follow_redirects=False).status_code == 303


def test_next_stays_on_this_site() -> None:
    assert safe_next("/studies/1.2.3") == "/studies/1.2.3"
    for elsewhere in ("https://evil.example/", "//evil.example/", "/\\evil.example", "", None):
        assert safe_next(elsewhere) == "/"


def test_a_token_revoked_while_signed_in_signs_the_browser_out(api: ApiHarness) -> None:
    client = signed_in(api, TokenRole.OPERATOR)
    assert client.get("/jobs", follow_redirects=False).status_code == 200
    with api.context.sessions.begin() as session:
        revoke(session, "operator", Actor.os_user())
    response = client.get("/jobs", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/sign-in?next=/jobs"
