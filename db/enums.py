"""Column values that code without SQLAlchemy needs too (a receiver process imports none)."""

from __future__ import annotations

from enum import StrEnum


class AssociationStatus(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"
