"""The ``outputs`` table: one row per DICOM instance that processing wrote.

The processing itself (``dicom_node.process``) never touches the database, so a Dask
worker runs it without one; the node records what comes back, and the offline
``dicom-node process --config`` records what it wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Output, OutputKind
from db.upsert import insert_for
from dicom_node.process import OutputRecord

REFRESHED_COLUMNS = (
    "sop_class_uid",
    "series_instance_uid",
    "kind",
    "path",
    "source_series_uid",
    "processor_name",
    "processor_version",
    "params",
    "created_at",
    "purged_at",
)
"""What a reprocessed input's row takes from the new record (``job_id`` only if given)."""


def upsert_outputs(
    session: Session, records: Sequence[OutputRecord], job_id: int | None = None
) -> list[Output]:
    """One ``outputs`` row per record (refreshed for a reprocessed input), in the caller's
    transaction; another node recording the same output meanwhile is not an error."""
    if not records:
        return []
    values = {
        record.sop_instance_uid: {
            "sop_instance_uid": record.sop_instance_uid,
            "sop_class_uid": record.sop_class_uid,
            "series_instance_uid": record.series_instance_uid,
            "kind": OutputKind(record.kind),
            "path": str(record.path.resolve()),
            "source_series_uid": record.source_series_uid,
            "processor_name": record.processor_name,
            "processor_version": record.processor_version,
            # The record carries the canonical parameter text that the UIDs hash.
            "params": json.loads(record.params),
            "created_at": dt.datetime.now(dt.UTC),
            "job_id": job_id,
            "purged_at": None,
        }
        for record in records
    }
    upsert = insert_for(session, Output)
    refreshed: dict[str, Any] = {name: upsert.excluded[name] for name in REFRESHED_COLUMNS}
    refreshed["job_id"] = func.coalesce(upsert.excluded.job_id, Output.job_id)
    session.execute(
        upsert.on_conflict_do_update(index_elements=[Output.sop_instance_uid.key], set_=refreshed),
        list(values.values()),
    )
    rows = session.scalars(
        select(Output)
        .where(Output.sop_instance_uid.in_(list(values)))
        .execution_options(populate_existing=True)
    )
    by_uid = {row.sop_instance_uid: row for row in rows}
    return [by_uid[record.sop_instance_uid] for record in records]


def record_outputs(database_url: str, records: Sequence[OutputRecord]) -> int:
    """Insert (or refresh, for a reprocessed input) one ``outputs`` row per record."""
    from db.session import migrated_session

    with migrated_session(database_url) as session:
        upsert_outputs(session, records)
    return len(records)
