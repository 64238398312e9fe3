"""Bearer-token authentication and role checks for every ``/api/v1`` route.

``require(role)`` is the dependency a route declares: the request's
``Authorization: Bearer <token>`` must name a token that is not revoked (else 401, with
``WWW-Authenticate: Bearer``) whose role allows ``role`` (else 403). Each refusal is an
``access_denied`` row in the audit trail, with the method and path (UIDs at most) and the
client's address; a token is never written anywhere.

The dashboard's browser sends no ``Authorization`` header: signing in puts the token in an
HttpOnly, SameSite=Strict cookie (``SESSION_COOKIE``), which a request without an
``Authorization`` header is authenticated by instead. A request that changes something
(any method but GET, HEAD, OPTIONS) with that cookie must also carry the header
``X-CSRF-Token`` equal to the ``CSRF_COOKIE`` cookie (double submit): a page of another
site can make the browser send the cookies, but can neither read them nor add a header
(else 403, audited). Bearer requests need no such header: a browser never adds one itself.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from db.enums import AuditActorKind, TokenRole
from dicom_node.api.context import ApiContext, get_context
from dicom_node.api.tokens import TokenInfo, allows, authenticate
from dicom_node.security import audit

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "AdminCaller",
    "Caller",
    "OperatorCaller",
    "ViewerCaller",
    "client_address",
    "csrf_matches",
    "deny",
    "new_csrf_token",
    "require",
]

SESSION_COOKIE = "dicom_node_session"
CSRF_COOKIE = "dicom_node_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(
    auto_error=False, description="An API token: `dicom-node tokens create NAME --role ROLE`."
)


@dataclass(frozen=True)
class Caller:
    """Who made an authenticated request."""

    token: TokenInfo
    address: str | None = None

    @property
    def actor(self) -> audit.Actor:
        return audit.Actor(AuditActorKind.API_TOKEN, self.token.name, self.address)

    @property
    def role(self) -> TokenRole:
        return self.token.role


def client_address(request: Request) -> str | None:
    return None if request.client is None else f"{request.client.host}:{request.client.port}"


def deny(
    context: ApiContext, request: Request, actor_name: str, reason: str, status_code: int
) -> HTTPException:
    """Record the refusal in its own transaction and return the error to raise."""
    with context.sessions.begin() as session:
        audit.record(
            session,
            action=audit.AuditAction.ACCESS_DENIED,
            actor=audit.Actor(AuditActorKind.API_TOKEN, actor_name, client_address(request)),
            outcome=audit.AuditOutcome.FAILURE,
            reason=reason,
            object_kind=audit.AuditObjectKind.REQUEST,
            object_id=f"{request.method} {request.url.path}"[: audit.NAME_LIMIT],
        )
    unauthorized = status_code == status.HTTP_401_UNAUTHORIZED
    headers = {"WWW-Authenticate": "Bearer"} if unauthorized else None
    return HTTPException(status_code, detail=reason, headers=headers)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(request: Request, presented: str | None) -> bool:
    """Whether ``presented`` (a header or a form field) equals the request's CSRF cookie."""
    expected = request.cookies.get(CSRF_COOKIE)
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def require(role: TokenRole) -> Callable[..., Caller]:
    """The dependency of a route that needs a token of ``role`` or above."""

    def authenticated_caller(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Caller:
        context = get_context(request)
        presented = _presented_token(context, request, credentials)
        with context.sessions.begin() as session:
            info = authenticate(session, presented)
        if info is None:
            raise deny(
                context,
                request,
                "(invalid)",
                "the token is unknown or revoked",
                status.HTTP_401_UNAUTHORIZED,
            )
        if not allows(info.role, role):
            raise deny(
                context,
                request,
                info.name,
                f"needs the {role} role; the token {info.name!r} has {info.role}",
                status.HTTP_403_FORBIDDEN,
            )
        return Caller(info, client_address(request))

    return authenticated_caller


def _presented_token(
    context: ApiContext, request: Request, credentials: HTTPAuthorizationCredentials | None
) -> str:
    """The bearer token, else the dashboard's cookie (with its CSRF check), else a 401."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and "authorization" not in request.headers:
        if request.method not in SAFE_METHODS and not csrf_matches(
            request, request.headers.get(CSRF_HEADER)
        ):
            raise deny(
                context,
                request,
                "(cookie)",
                f"a change made with the dashboard's cookie needs the {CSRF_HEADER} header "
                "of the signed-in page",
                status.HTTP_403_FORBIDDEN,
            )
        return cookie
    raise deny(
        context,
        request,
        "(none)",
        "no bearer token: send 'Authorization: Bearer <token>'",
        status.HTTP_401_UNAUTHORIZED,
    )


# What a route declares: ``def route(caller: ViewerCaller) -> ...``.
ViewerCaller = Annotated[Caller, Depends(require(TokenRole.VIEWER))]
OperatorCaller = Annotated[Caller, Depends(require(TokenRole.OPERATOR))]
AdminCaller = Annotated[Caller, Depends(require(TokenRole.ADMIN))]
