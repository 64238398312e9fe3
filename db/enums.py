"""Column values that code without SQLAlchemy needs too: a receiver process imports none,
and the command line defers it until a command needs the database."""

from __future__ import annotations

from enum import StrEnum


class AssociationStatus(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
