"""One private PostgreSQL server for the database tests, and empty databases on it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dicom_node.testing_postgres import running_postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of the server's first database (``running_postgres``)."""
    with running_postgres() as url:
        yield url


def new_postgres_database(server_url: str) -> str:
    """A new, empty database on the server; returns its URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


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
