"""What the REST API's routes reach of the running node: its settings, its database and
the stages a change must wake (``ApiContext``), kept on the FastAPI app's state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.metrics import NodeMetrics


def _nothing() -> None:
    return None


@dataclass
class ApiContext:
    """``wake_dispatcher`` and ``wake_exporter``: called after a change that gives them work
    (a job or an export retried, a rule changed); ``executor_slots``: how many jobs the
    executor can run now (None: no executor in this process, so /readyz does not ask);
    ``metrics``: what ``/metrics`` serves (without a node: a registry of its own, whose
    queue depths are read from ``sessions``)."""

    settings: Settings
    sessions: sessionmaker[Session]
    wake_dispatcher: Callable[[], None] = field(default=_nothing)
    wake_exporter: Callable[[], None] = field(default=_nothing)
    executor_slots: Callable[[], int] | None = None
    # Rules or destinations changed: the dispatcher reloads them now, not at its next reload.
    routing_changed: Callable[[], None] = field(default=_nothing)
    metrics: NodeMetrics | None = None

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = NodeMetrics(self.sessions)


def get_context(request: Request) -> ApiContext:
    context = request.app.state.context
    assert isinstance(context, ApiContext)
    return context
