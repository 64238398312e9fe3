"""The audit trail's cost on the ingest path: the indexer's ``write_batch`` on 2,000 instances
(batches of 256, one association, one series, SQLite) with the audit rows as the node writes
them (one per association and series of a batch), against the same without audit rows (the
reference) and with one row per instance (the grain not chosen).

    .venv/bin/python bench/audit_index.py [--rounds 9]

Prints instances/s (median and best of the rounds) and each variant's ratio to the reference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from db.models import Association  # noqa: E402
from db.session import make_engine, make_sessionmaker, upgrade  # noqa: E402
from dicom_node import index  # noqa: E402
from dicom_node.records import AssociationOpened, IndexRecord, InstanceStored  # noqa: E402
from dicom_node.security import audit  # noqa: E402
from dicom_node.storage import InstanceKey  # noqa: E402

INSTANCES, BATCH = 2000, 256
AuditStored = Callable[[Session, Sequence[InstanceStored]], None]
as_the_node_does: AuditStored = index._audit_stored


def no_audit_rows(_session: Session, _stored: Sequence[InstanceStored]) -> None:
    return None


def a_row_per_instance(session: Session, stored: Sequence[InstanceStored]) -> None:
    actors: dict[str | None, audit.Actor] = {}
    for record in stored:
        if record.association_id not in actors:
            row = session.get(Association, record.association_id)
            assert row is not None
            actors[record.association_id] = audit.Actor.dicom_peer(
                row.calling_ae_title, row.peer_address, row.peer_port
            )
        audit.record(
            session,
            action=audit.AuditAction.INSTANCES_STORED,
            actor=actors[record.association_id],
            object_kind=audit.AuditObjectKind.ASSOCIATION,
            object_id=record.association_id,
            study_instance_uid=record.key.study_instance_uid,
            series_instance_uid=record.key.series_instance_uid,
            sop_instance_uid=record.key.sop_instance_uid,
            count=1,
            details={"bytes": record.size_bytes},
            at=record.received_at,
        )


VARIANTS: dict[str, AuditStored] = {
    "no audit rows (reference)": no_audit_rows,
    "a row per association and series of a batch (the node)": as_the_node_does,
    "a row per instance": a_row_per_instance,
}


def records() -> list[IndexRecord]:
    now = dt.datetime.now(dt.UTC)
    study, series = generate_uid(), generate_uid()
    opened: list[IndexRecord] = [
        AssociationOpened("a-1", "CT1", "NODE", "127.0.0.1", 5000, True, None, now)
    ]
    return opened + [
        InstanceStored(
            InstanceKey.checked(study, series, generate_uid()),
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.840.10008.1.2.1",
            Path(f"/spool/{number}.dcm"),
            525_000,
            now,
            "a-1",
            modality="CT",
        )
        for number in range(INSTANCES)
    ]


def instances_per_second(audit_stored: AuditStored, folder: Path) -> float:
    url = f"sqlite:///{folder / f'{time.monotonic_ns()}.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    batch_records = records()
    index._audit_stored = audit_stored  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        for first in range(0, len(batch_records), BATCH):
            with sessions.begin() as session:
                index.write_batch(session, batch_records[first : first + BATCH])
        return INSTANCES / (time.perf_counter() - start)
    finally:
        index._audit_stored = as_the_node_does  # type: ignore[assignment]
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    rounds = parser.parse_args().rounds
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as folder:
        for _ in range(rounds):  # interleaved, so a busy moment costs every variant
            for name, variant in VARIANTS.items():
                rates[name].append(instances_per_second(variant, Path(folder)))
    reference = statistics.median(next(iter(rates.values())))
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"{name:56} median {median:6.0f}/s  best {max(values):6.0f}/s  "
            f"ratio {median / reference:.2f}"
        )


if __name__ == "__main__":
    main()
