"""A moment given by a person: ``30m``, ``1h``, ``7d``, ``2w`` ago, or an ISO 8601 time."""

from __future__ import annotations

import datetime as dt
import re

from processors.errors import BadInputError

DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BadMomentError(BadInputError):
    """Neither a duration nor an ISO 8601 time."""


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """``30m``, ``1h``, ``7d``, ``2w`` ago, or an ISO 8601 date or time (UTC unless it
    says otherwise), as UTC; anything else is a ``BadMomentError``."""
    now = now or dt.datetime.now(dt.UTC)
    duration = DURATION.match(value.strip().lower())
    if duration:
        try:
            return now - dt.timedelta(seconds=float(duration[1]) * UNIT_SECONDS[duration[2]])
        except OverflowError:
            raise BadMomentError(f"{value!r} reaches before the year 1") from None
    try:
        moment = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadMomentError(
            f"expected a duration (30m, 1h, 7d, 2w) or an ISO 8601 time, got {value!r}"
        ) from None
    try:
        return moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    except OverflowError:
        raise BadMomentError(f"{value!r} is out of range in UTC") from None
