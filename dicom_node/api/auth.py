"""Bearer-token authentication and role checks for every ``/api/v1`` route.

``require(role)`` is the dependency a route declares: the request's
``Authorization: Bearer <token>`` must name a token that is not revoked (else 401, with
``WWW-Authenticate: Bearer``) whose role allows ``role`` (else 403). Each refusal is an
``access_denied`` row in the audit trail, with the method and path (UIDs at most) and the
client's address; a token is never written anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from db.enums import AuditActorKind, TokenRole
from dicom_node.api.context import ApiContext, get_context
from dicom_node.api.tokens import TokenInfo, allows, authenticate
from dicom_node.security import audit

__all__ = ["AdminCaller", "Caller", "OperatorCaller", "ViewerCaller", "require"]

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


def _client_address(request: Request) -> str | None:
    return None if request.client is None else f"{request.client.host}:{request.client.port}"


def _deny(
    context: ApiContext, request: Request, actor_name: str, reason: str, status_code: int
) -> HTTPException:
    """Record the refusal in its own transaction and return the error to raise."""
    with context.sessions.begin() as session:
        audit.record(
            session,
            action=audit.AuditAction.ACCESS_DENIED,
            actor=audit.Actor(AuditActorKind.API_TOKEN, actor_name, _client_address(request)),
            outcome=audit.AuditOutcome.FAILURE,
            reason=reason,
            object_kind=audit.AuditObjectKind.REQUEST,
            object_id=f"{request.method} {request.url.path}"[: audit.NAME_LIMIT],
        )
    unauthorized = status_code == status.HTTP_401_UNAUTHORIZED
    headers = {"WWW-Authenticate": "Bearer"} if unauthorized else None
    return HTTPException(status_code, detail=reason, headers=headers)


def require(role: TokenRole) -> Callable[..., Caller]:
    """The dependency of a route that needs a token of ``role`` or above."""

    def authenticated_caller(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Caller:
        context = get_context(request)
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise _deny(
                context,
                request,
                "(none)",
                "no bearer token: send 'Authorization: Bearer <token>'",
                status.HTTP_401_UNAUTHORIZED,
            )
        with context.sessions.begin() as session:
            info = authenticate(session, credentials.credentials)
        if info is None:
            raise _deny(
                context,
                request,
                "(invalid)",
                "the token is unknown or revoked",
                status.HTTP_401_UNAUTHORIZED,
            )
        if not allows(info.role, role):
            raise _deny(
                context,
                request,
                info.name,
                f"needs the {role} role; the token {info.name!r} has {info.role}",
                status.HTTP_403_FORBIDDEN,
            )
        return Caller(info, _client_address(request))

    return authenticated_caller


# What a route declares: ``def route(caller: ViewerCaller) -> ...``.
ViewerCaller = Annotated[Caller, Depends(require(TokenRole.VIEWER))]
OperatorCaller = Annotated[Caller, Depends(require(TokenRole.OPERATOR))]
AdminCaller = Annotated[Caller, Depends(require(TokenRole.ADMIN))]
