"""Signing in and out of the dashboard, and the dependency of every page.

Signing in posts a token; when ``authenticate`` knows it, the response sets the session
cookie (the token itself: HttpOnly, SameSite=Strict, Secure under HTTPS, gone when the
browser closes) and a fresh CSRF token. A refused token is an ``access_denied`` audit row,
as on the API. A page opened without a valid cookie sends the browser to the sign-in form,
which comes back to that page afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import RedirectResponse, Response

from db.enums import AuditActorKind, TokenRole
from dicom_node.api.auth import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    Caller,
    client_address,
    csrf_matches,
    deny,
    new_csrf_token,
)
from dicom_node.api.context import get_context
from dicom_node.api.tokens import TokenInfo, allows, authenticate
from dicom_node.dashboard.rendering import is_https, page, set_csrf_cookie
from dicom_node.security import audit

router = APIRouter(include_in_schema=False)

SIGN_IN_PATH = "/sign-in"


def signed_in_token(request: Request) -> TokenInfo | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    with get_context(request).sessions.begin() as session:
        return authenticate(session, token)


def page_caller(request: Request) -> Caller:
    """Who is signed in; else a redirect to the sign-in form (then back here)."""
    info = signed_in_token(request)
    if info is None:
        back = quote(request.url.path, safe="/")
        raise HTTPException(
            status.HTTP_303_SEE_OTHER, headers={"Location": f"{SIGN_IN_PATH}?next={back}"}
        )
    return Caller(info, client_address(request))


def page_caller_of(role: TokenRole) -> Callable[[Request], Caller]:
    """Who is signed in, with ``role`` or above: a lower role is a 403 (audited), as on the
    API; the page is not linked for it."""

    def caller_of_role(request: Request) -> Caller:
        caller = page_caller(request)
        if not allows(caller.role, role):
            raise deny(
                get_context(request),
                request,
                caller.token.name,
                f"needs the {role} role; the token {caller.token.name!r} has {caller.role}",
                status.HTTP_403_FORBIDDEN,
            )
        return caller

    return caller_of_role


PageCaller = Annotated[Caller, Depends(page_caller)]
AdminPageCaller = Annotated[Caller, Depends(page_caller_of(TokenRole.ADMIN))]


def safe_next(value: str | None) -> str:
    """A path on this site only: never another site (``//host`` or ``https://host``)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


@router.get(SIGN_IN_PATH)
def sign_in_form(request: Request, next: str = "/") -> Response:
    return page(request, "sign_in.html", None, next_path=safe_next(next), error=None)


@router.post(SIGN_IN_PATH)
def sign_in(
    request: Request,
    token: Annotated[str, Form()],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    next_path = safe_next(next)
    if not csrf_matches(request, csrf_token):
        return page(
            request,
            "sign_in.html",
            None,
            status_code=status.HTTP_403_FORBIDDEN,
            next_path=next_path,
            error="The sign-in form had expired: please sign in again.",
        )
    with get_context(request).sessions.begin() as session:
        info = authenticate(session, token.strip())
        if info is None:
            audit.record(
                session,
                action=audit.AuditAction.ACCESS_DENIED,
                actor=audit.Actor(AuditActorKind.API_TOKEN, "(invalid)", client_address(request)),
                outcome=audit.AuditOutcome.FAILURE,
                reason="dashboard sign-in with a token that is unknown or revoked",
                object_kind=audit.AuditObjectKind.REQUEST,
                object_id=f"POST {SIGN_IN_PATH}",
            )
    if info is None:
        return page(
            request,
            "sign_in.html",
            None,
            status_code=status.HTTP_401_UNAUTHORIZED,
            next_path=next_path,
            error="That token is unknown or revoked.",
        )
    response = RedirectResponse(next_path, status_code=status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        SESSION_COOKIE,
        token.strip(),
        httponly=True,
        samesite="strict",
        secure=is_https(request),
        path="/",
    )
    set_csrf_cookie(request, response, new_csrf_token())  # a new one for the new session
    return response


@router.post("/sign-out")
def sign_out(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    if not csrf_matches(request, csrf_token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "sign out from the dashboard's own page")
    response = RedirectResponse(SIGN_IN_PATH, status_code=status.HTTP_303_SEE_OTHER)
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        response.delete_cookie(
            name, path="/", httponly=True, samesite="strict", secure=is_https(request)
        )
    return response
