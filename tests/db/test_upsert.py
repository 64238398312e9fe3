from __future__ import annotations

import pytest
from sqlalchemy import create_engine, create_mock_engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Study
from db.upsert import UnsupportedDatabaseError, insert_for


def test_the_insert_is_the_sessions_dialects() -> None:
    assert isinstance(insert_for(Session(create_engine("sqlite://")), Study), sqlite.Insert)
    on_postgres = Session(create_mock_engine("postgresql+psycopg://", lambda *_: None))
    assert isinstance(insert_for(on_postgres, Study), postgresql.Insert)


def test_another_database_is_refused_with_its_name() -> None:
    on_mysql = Session(create_mock_engine("mysql://", lambda *_: None))
    with pytest.raises(UnsupportedDatabaseError, match="mysql"):
        insert_for(on_mysql, Study)
