"""Test support for the REST API: an app on a migrated database with a token per role."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from db.enums import TokenRole
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.api.app import create_app
from dicom_node.api.context import ApiContext
from dicom_node.api.tokens import create_token
from dicom_node.config import Settings
from dicom_node.security.audit import Actor


@dataclass
class ApiHarness:
    """``client`` talks to the app in this process; ``tokens`` holds one token per role
    (named after the role); ``context`` is what the routes see."""

    context: ApiContext
    client: TestClient
    engine: Engine
    tokens: dict[TokenRole, str] = field(default_factory=dict)

    def headers(self, role: TokenRole) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@contextmanager
def api_harness(settings: Settings, context: ApiContext | None = None) -> Iterator[ApiHarness]:
    """The API of a node with ``settings`` (its database migrated, its spool made), without
    the node's DICOM side: routes that wake the dispatcher or exporter wake nothing unless
    ``context`` says otherwise."""
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    url = settings.effective_database_url
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    context = context or ApiContext(settings, sessions)
    tokens: dict[TokenRole, str] = {}
    with sessions.begin() as session:
        for role in TokenRole:
            tokens[role] = create_token(session, str(role), role, Actor.os_user())
    try:
        with TestClient(create_app(context)) as client:
            yield ApiHarness(context, client, engine, tokens)
    finally:
        engine.dispose()


def settings_for(root: Path, **overrides: object) -> Settings:
    from dicom_node.testing import local_settings

    return local_settings(root, **overrides)
