"""Helpers of the export tests: targets, the exports rows, what a node received."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Job, Output, OutputKind
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.config import Settings
from dicom_node.export.queue import RetryPolicy
from dicom_node.export.target import ExportTarget
from dicom_node.node import Node
from dicom_node.testing import free_port

T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.UTC)
FAST = RetryPolicy(base_seconds=2.0, cap_seconds=600.0, jitter=0.5)


@contextmanager
def migrated_sessions(url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the database at ``url``, migrated to the current schema."""
    upgrade(url)
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def target_for(node_settings: Settings, name: str = "pacs", **kwargs: object) -> ExportTarget:
    return ExportTarget(
        name=name,
        host="127.0.0.1",
        port=node_settings.port,
        ae_title=node_settings.ae_title,
        calling_ae_title="EXPORTER",
        timeout=10.0,
        **kwargs,  # type: ignore[arg-type]
    )


def refusing_target(name: str = "pacs", max_attempts: int = 3) -> ExportTarget:
    return ExportTarget(
        name, "127.0.0.1", free_port(), "NOBODY", max_attempts=max_attempts, timeout=5.0
    )


def received(node_settings: Settings) -> set[str]:
    return {path.stem for path in node_settings.spool_dir.rglob("*.dcm")}


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def rows(sessions: sessionmaker[Session]) -> list[Export]:
    with sessions() as session:
        return list(session.scalars(select(Export).order_by(Export.id)))


def output_and_export(
    session: Session,
    job: Job,
    state: ExportState,
    *,
    next_attempt_at: dt.datetime,
    destination: str = "pacs",
    attempts: int = 1,
    last_error: str | None = None,
    delivered_at: dt.datetime | None = None,
) -> Export:
    """A SEG output of ``job`` and its export row to ``destination`` in ``state`` (of 3
    attempts), flushed: both have their ids."""
    uid = f"2.25.{uuid.uuid4().int}"
    output = Output(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        kind=OutputKind.SEG,
        path=f"/outputs/{uid}.dcm",
        series_instance_uid=f"2.25.{uuid.uuid4().int}",
        source_series_uid=job.series_instance_uid,
        processor_name="threshold_segment",
        processor_version="1",
        params={},
        job_id=job.id,
    )
    session.add(output)
    session.flush()
    export = Export(
        destination=destination,
        host="127.0.0.1",
        port=104,
        ae_title="PACS",
        sop_instance_uid=output.sop_instance_uid,
        sop_class_uid=output.sop_class_uid,
        path=output.path,
        state=state,
        attempts=attempts,
        max_attempts=3,
        next_attempt_at=next_attempt_at,
        last_error=last_error,
        delivered_at=delivered_at,
        output_id=output.id,
    )
    session.add(export)
    session.flush()
    return export


@contextmanager
def running(settings: Settings) -> Iterator[Node]:
    """A whole node in this process (receiver, indexer, exporter) with ``settings``."""
    node = Node(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_seconds=5)


def exports_of(node: Node) -> list[Export]:
    assert node.sessions is not None
    return rows(node.sessions)


def wait_for(what: str, condition: Callable[[], bool], seconds: float = 90.0) -> None:
    """Until ``condition()``; an ``AssertionError`` naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
