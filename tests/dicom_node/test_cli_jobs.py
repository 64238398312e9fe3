"""`dicom-node jobs cancel` and `exports cancel`: the state changes, the audit rows, and one
line with exit code 2 for an unknown id or a state that refuses it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from db.models import Export, ExportState, Instance, Job, JobState
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.cli import app
from dicom_node.export.queue import enqueue
from dicom_node.export.target import ExportTarget
from dicom_node.jobs.state import create_jobs
from dicom_node.security.audit import AuditAction
from dicom_node.storage import Spool
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import add_series, settings_with, study_id

runner = CliRunner()


def test_cancel_a_job_and_an_export(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    url = f"sqlite:///{data_dir / 'dicom-node.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions: sessionmaker[Session] = make_sessionmaker(engine)
    add_series(Spool(tmp_path / "spool", fsync=False), sessions, number=1)
    with sessions.begin() as session:
        rule = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}
        [job] = create_jobs(session, settings_with(rule), study_id(sessions))
        path = Path(session.scalars(select(Instance.path)).first() or "")
        [export] = enqueue(session, ExportTarget("pacs", "127.0.0.1", 104, "PACS"), [path])

    def cancel(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [*args, "--config", str(config)])
        return result.exit_code, result.output.strip().splitlines()[-1]  # after any log lines

    assert cancel("jobs", "cancel", str(job.id)) == (0, f"job {job.id} is cancelled")
    assert cancel("exports", "cancel", str(export.id)) == (0, f"export {export.id} is cancelled")
    code, said = cancel("jobs", "cancel", str(job.id))
    assert code == 2 and "is cancelled; only a queued or running job" in said
    code, said = cancel("exports", "cancel", str(export.id))
    assert code == 2 and "is cancelled; only a pending or failed export" in said
    assert cancel("jobs", "cancel", "999") == (2, "error: no job with id 999")
    assert cancel("exports", "cancel", "999") == (2, "error: no export with id 999")
    with sessions() as session:
        assert session.scalars(select(Job.state)).one() == JobState.CANCELLED
        assert session.scalars(select(Export.state)).one() == ExportState.CANCELLED
    asked = audit_rows(sessions, AuditAction.CANCEL_REQUESTED)
    assert [(row["actor_kind"], row["object_kind"]) for row in asked] == [
        ("os_user", "job"),
        ("os_user", "export"),
    ]
    engine.dispose()
