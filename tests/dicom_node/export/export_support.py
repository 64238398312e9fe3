"""Helpers of the export tests: targets, the exports rows, what a node received."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.config import Settings
from dicom_node.export.queue import RetryPolicy
from dicom_node.export.target import ExportTarget
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
