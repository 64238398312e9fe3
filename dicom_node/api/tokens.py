"""Bearer tokens of the REST API and the roles they carry.

A token is ``dn_`` followed by 32 random bytes (``secrets.token_urlsafe``): the prefix
makes a leaked token recognisable to a secret scanner and to a person. It is shown once,
when created; the database keeps its SHA-256 only.

Why a plain SHA-256 and not a slow password hash (bcrypt, scrypt, Argon2): those slow
down guessing a *low-entropy* secret from its hash. A token of 256 random bits cannot be
guessed whatever the speed of the hash, so a fast one-way hash gives the same protection
to a stolen database and lets each request be checked with one indexed lookup.

Roles are ordered: viewer < operator < admin; a role allows what the roles below it allow.
The caller commits: creating or revoking a token adds its audit row to the same session,
so the change and its audit row commit together.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import ApiToken, TokenRole, as_utc
from dicom_node.security import audit
from processors.errors import BadInputError

__all__ = [
    "TOKEN_PREFIX",
    "TokenError",
    "TokenInfo",
    "TokenRole",
    "allows",
    "authenticate",
    "create_token",
    "list_tokens",
    "revoke",
]

TOKEN_PREFIX = "dn_"  # noqa: S105 (a prefix, not a secret)
TOKEN_RANDOM_BYTES = 32
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
ROLE_ORDER = (TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN)


class TokenError(BadInputError):
    """A token name that is malformed, taken, unknown or already revoked."""


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never the token nor its hash."""

    name: str
    role: TokenRole
    created_at: dt.datetime
    created_by: str
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: ApiToken) -> TokenInfo:
        return cls(
            name=row.name,
            role=TokenRole(row.role),
            created_at=as_utc(row.created_at),
            created_by=row.created_by,
            revoked_at=None if row.revoked_at is None else as_utc(row.revoked_at),
            last_used_at=None if row.last_used_at is None else as_utc(row.last_used_at),
        )

    def as_dict(self) -> dict[str, Any]:
        def iso(moment: dt.datetime | None) -> str | None:
            return None if moment is None else moment.isoformat()

        return {
            "name": self.name,
            "role": str(self.role),
            "created_at": iso(self.created_at),
            "created_by": self.created_by,
            "last_used_at": iso(self.last_used_at),
            "revoked_at": iso(self.revoked_at),
        }


def allows(role: TokenRole, needed: TokenRole) -> bool:
    """Whether a token of ``role`` may do what needs ``needed``."""
    return ROLE_ORDER.index(role) >= ROLE_ORDER.index(needed)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise TokenError(
            f"bad token name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def create_token(session: Session, name: str, role: TokenRole, created_by: audit.Actor) -> str:
    """Add a token called ``name`` with ``role``; returns the token, which is not kept."""
    check_name(name)
    role = TokenRole(role)
    if session.scalars(select(ApiToken.id).where(ApiToken.name == name)).first() is not None:
        raise TokenError(f"a token named {name!r} exists already")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)
    row = ApiToken(
        name=name,
        role=role,
        token_sha256=token_sha256(token),
        created_at=audit.utcnow(),
        created_by=f"{created_by.kind}:{created_by.name}",
    )
    try:
        with session.begin_nested():  # another admin took the name since the check above
            session.add(row)
    except IntegrityError:
        raise TokenError(f"a token named {name!r} exists already") from None
    _record(session, created_by, name, {"change": "created", "role": str(role)})
    return token


def authenticate(session: Session, presented: str) -> TokenInfo | None:
    """The token's details if ``presented`` is a token that is not revoked, else None;
    records when it was last used."""
    if not presented.startswith(TOKEN_PREFIX):
        return None
    digest = token_sha256(presented)
    # Looked up by its hash: the lookup's timing tells at most about a guess's hash,
    # never about a stored token; the constant-time comparison is the usual belt too.
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    if row.revoked_at is not None:
        return None
    now = audit.utcnow()
    # Written at most once a minute, so that a busy dashboard does not write on every read.
    if row.last_used_at is None or now - as_utc(row.last_used_at) >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    return TokenInfo.from_row(row)


def revoke(session: Session, name: str, revoked_by: audit.Actor) -> TokenInfo:
    """Revoke the token called ``name``: it authenticates no more. The row stays, so that
    the audit trail's actor keeps a meaning and the name is not given to another token."""
    row = session.scalars(select(ApiToken).where(ApiToken.name == name)).first()
    if row is None:
        raise TokenError(f"no token named {name!r}")
    if row.revoked_at is not None:
        raise TokenError(f"the token {name!r} is revoked already")
    row.revoked_at = audit.utcnow()
    _record(session, revoked_by, name, {"change": "revoked"})
    session.flush()
    return TokenInfo.from_row(row)


def list_tokens(session: Session) -> list[TokenInfo]:
    """Every token, revoked ones included, by name."""
    return [
        TokenInfo.from_row(row) for row in session.scalars(select(ApiToken).order_by(ApiToken.name))
    ]


def _record(session: Session, actor: audit.Actor, name: str, details: dict[str, str]) -> None:
    audit.record(
        session,
        action=audit.AuditAction.TOKEN_CHANGED,
        actor=actor,
        object_kind=audit.AuditObjectKind.TOKEN,
        object_id=name,
        details=dict(details),
    )
