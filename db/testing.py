"""For tests: another writer that gets in first, as a second node sharing the database would."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session


@dataclass
class Race:
    happened: bool = False


@contextlib.contextmanager
def writer_gets_in_first(
    engine: Engine, table: str, write: Callable[[Session], object]
) -> Iterator[Race]:
    """Just before the first ``INSERT INTO table`` on ``engine``, run ``write`` in a session
    of its own and commit it: the other node inserts the same key between this one's
    SELECT (or its decision to insert) and its INSERT. ``Race.happened`` says it ran."""
    race = Race()
    prefix = f"INSERT INTO {table} "

    def before_insert(
        _connection: Any, _cursor: Any, statement: str, *_args: Any, **_kwargs: Any
    ) -> None:
        if race.happened or not statement.lstrip().startswith(prefix):
            return
        race.happened = True
        with Session(engine) as other, other.begin():
            write(other)

    event.listen(engine, "before_cursor_execute", before_insert)
    try:
        yield race
    finally:
        event.remove(engine, "before_cursor_execute", before_insert)
