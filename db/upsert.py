"""``INSERT ... ON CONFLICT`` in the session's dialect (SQLite or PostgreSQL).

Selecting a row and inserting it when absent races with another node (or thread)
inserting the same key between the two statements: the loser gets an
``IntegrityError``. An insert that names its conflict target does not.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base
from processors.errors import BadInputError

DialectInsert = postgresql.Insert | sqlite.Insert


class UnsupportedDatabaseError(BadInputError):
    """The database is neither SQLite nor PostgreSQL."""


def insert_for(session: Session, model: type[Base]) -> DialectInsert:
    """An insert into ``model``'s table that has ``on_conflict_do_nothing/do_update``.

    A table insert, not an ORM one: executed with many rows, it skips the ORM's per-row
    bookkeeping, and it leaves the session's objects alone (select them afterwards).
    """
    table = Base.metadata.tables[model.__tablename__]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise UnsupportedDatabaseError(f"no INSERT ... ON CONFLICT for the {dialect} dialect")
