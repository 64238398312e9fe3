"""The ``outputs`` table: rows for what processing wrote, refreshed on reprocessing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from db.models import Output, OutputKind
from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.outputs import record_outputs, upsert_outputs
from dicom_node.process import OutputRecord


def record(tmp_path: Path, uid: str, kind: str) -> OutputRecord:
    return OutputRecord(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        series_instance_uid="1.2.3.4",
        kind=kind,
        path=tmp_path / f"{uid}.dcm",
        source_series_uid="1.2.3",
        processor_name="threshold_segment",
        processor_version="1.0.0",
        params='{"preset":"body"}',  # canonical JSON, as Provenance writes it
    )


def test_a_reprocessed_input_refreshes_its_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    first = [record(tmp_path, "1.2.3.4.1", "seg"), record(tmp_path, "1.2.3.4.2", "sr")]
    assert record_outputs(url, first) == 2
    again = [replace(first[0], processor_version="1.0.1")]
    assert record_outputs(url, again) == 1
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = session.scalars(select(Output).order_by(Output.sop_instance_uid)).all()
            assert [(r.kind, r.processor_version) for r in rows] == [
                (OutputKind.SEG, "1.0.1"),
                (OutputKind.SR, "1.0.0"),
            ]
            assert rows[0].params == {"preset": "body"}  # a document, not text
            assert rows[0].path == str((tmp_path / "1.2.3.4.1.dcm").resolve())
    finally:
        engine.dispose()


def test_an_output_another_node_records_meanwhile_is_refreshed_not_an_error(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    mine = record(tmp_path, "1.2.3.4.1", "seg")
    theirs = replace(mine, path=tmp_path / "theirs.dcm")
    racing = writer_gets_in_first(engine, "outputs", lambda other: upsert_outputs(other, [theirs]))
    with racing as race, sessions.begin() as session:
        [row] = upsert_outputs(session, [mine], job_id=None)
    assert race.happened
    with sessions() as session:
        stored = session.scalars(select(Output)).one()
    assert (stored.id, stored.path) == (row.id, str(mine.path.resolve()))
    engine.dispose()
