"""One PostgreSQL server for the whole run (shared by every conftest that asks), and empty
databases on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.testing_postgres import new_database, shared_postgres_server


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of the shared server's first database (``shared_postgres_server``)."""
    return shared_postgres_server()


def new_postgres_database(server_url: str) -> str:
    """A new, empty database on the server; returns its URL."""
    return new_database(server_url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database: a SQLite file, or one on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def postgres_database(postgres_server: str) -> str:
    """The URL of a new, empty database on the PostgreSQL server."""
    return new_postgres_database(postgres_server)
