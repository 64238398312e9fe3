"""One page of a search: ``Paging`` says which rows, ``Page`` carries them with the total."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar, TypeVarTuple

from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from db.models import as_utc

ItemT = TypeVar("ItemT")
RowT = TypeVarTuple("RowT")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


UtcDateTime = Annotated[dt.datetime, AfterValidator(as_utc)]
"""A stored time, always with its UTC offset."""


@dataclass(frozen=True)
class Paging:
    """Skip ``offset`` rows, then take ``limit`` (``None``: all of them)."""

    limit: int | None = DEFAULT_LIMIT
    offset: int = 0

    def apply(self, statement: Select[*RowT]) -> Select[*RowT]:
        statement = statement.offset(self.offset)
        return statement if self.limit is None else statement.limit(self.limit)


EVERYTHING = Paging(limit=None)


class Page(BaseModel, Generic[ItemT]):
    """``items``: this page, in a stable order; ``total``: how many match in all."""

    items: list[ItemT]
    total: int = Field(ge=0)
    limit: int | None
    offset: int = Field(ge=0)


def count_of(session: Session, statement: Select[*RowT]) -> int:
    """How many rows ``statement`` (unordered, unpaged) selects."""
    return int(session.scalar(select(func.count()).select_from(statement.subquery())) or 0)
