"""The ``outputs`` table: one row per DICOM instance that processing wrote.

The processing itself (``dicom_node.process``) never touches the database, so a Dask
worker runs it without one; the node records what comes back, and the offline
``dicom-node process --config`` records what it wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Output, OutputKind
from dicom_node.process import OutputRecord


def upsert_outputs(
    session: Session, records: Sequence[OutputRecord], job_id: int | None = None
) -> list[Output]:
    """One ``outputs`` row per record (refreshed for a reprocessed input), in the caller's
    transaction."""
    rows: list[Output] = []
    for record in records:
        row = session.scalars(
            select(Output).where(Output.sop_instance_uid == record.sop_instance_uid)
        ).one_or_none()
        if row is None:
            row = Output(sop_instance_uid=record.sop_instance_uid)
            session.add(row)
        row.sop_class_uid = record.sop_class_uid
        row.series_instance_uid = record.series_instance_uid
        row.kind = OutputKind(record.kind)
        row.path = str(record.path.resolve())
        row.source_series_uid = record.source_series_uid
        row.processor_name = record.processor_name
        row.processor_version = record.processor_version
        # The record carries the canonical parameter text that the UIDs hash.
        row.params = json.loads(record.params)
        row.created_at = dt.datetime.now(dt.UTC)
        row.job_id = job_id if job_id is not None else row.job_id
        rows.append(row)
    session.flush()
    return rows


def record_outputs(database_url: str, records: Sequence[OutputRecord]) -> int:
    """Insert (or refresh, for a reprocessed input) one ``outputs`` row per record."""
    from db.session import make_engine, make_sessionmaker, upgrade

    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as session, session.begin():
            upsert_outputs(session, records)
    finally:
        engine.dispose()
    return len(records)
