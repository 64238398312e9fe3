"""Reading a running node's database from a test: quicker than a CLI process per poll,
which matters on a loaded machine."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, Job
from db.session import make_engine, make_sessionmaker

T = TypeVar("T")


@contextmanager
def node_sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def exports(sessions: sessionmaker[Session]) -> list[Export]:
    with sessions() as session:
        return list(session.scalars(select(Export).order_by(Export.id)))


def _shown(value: object) -> str:
    if isinstance(value, list):
        fields = ("id", "state", "attempts", "claimed_by", "error", "sop_instance_uid")
        return repr([{f: getattr(row, f) for f in fields if hasattr(row, f)} for row in value])
    return repr(value)


def wait_until(
    read: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = 120.0
) -> T:
    """``read()`` once ``done`` holds for it; AssertionError with the last value if not."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s; last: {_shown(value)}")
        time.sleep(0.2)
