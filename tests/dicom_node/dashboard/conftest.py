"""The API harness of the API tests (the dashboard is served by the same app), and an
empty database on SQLite or PostgreSQL for the overview's SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.db.conftest import new_postgres_database, postgres_server
from tests.dicom_node.api.conftest import api

__all__ = ["api", "database_url", "postgres_server"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dashboard.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))
