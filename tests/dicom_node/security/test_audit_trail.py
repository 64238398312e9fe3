"""The audit trail of a whole loop: a sender's study through a node (received, completed,
processed, exported to a second node), a refused association, the command line reading
it. Every step has its row; no row holds the patient's name, ID or birth date."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.node import Node
from dicom_node.scu import AssociationFailedError, echo, scan_files, send
from dicom_node.security.audit import AuditAction
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings
from tests.dicom_node.security.audit_support import audit_rows

PATIENT_NAME = "Auditova^Henrietta^Q"
PATIENT_ID = "PID-AUDIT-4711"
BIRTH_DATE = "19450817"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Node]:
    """A second node that receives what the first one sends out."""
    node = Node(local_settings(tmp_path / "pacs", ae_title="PACS"))
    node.start()
    yield node
    node.stop(grace_seconds=1)


@pytest.fixture
def node(tmp_path: Path, pacs: Node) -> Iterator[Node]:
    settings = local_settings(
        tmp_path / "node",
        study_quiet_seconds=0.5,
        assembler_interval_seconds=0.2,
        require_called_ae_title=True,
        destinations=[
            {"name": "pacs", "host": "127.0.0.1", "port": pacs.settings.port, "ae_title": "PACS"}
        ],
        rules=[{"name": "ct", "pipeline": ["gaussian"], "destinations": ["pacs"]}],
    )
    running = Node(settings)
    running.start()
    yield running
    running.stop(grace_seconds=1)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_every_step_of_the_loop_is_audited_without_patient_values(
    node: Node, pacs: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = generate_series(
        num_slices=4, rows=32, columns=32, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )
    for dataset in series.datasets:
        dataset.PatientBirthDate = BIRTH_DATE
    series.write(tmp_path / "study")
    files, _skipped = scan_files([tmp_path / "study"])
    port = node.settings.port
    report = send(files, "127.0.0.1", port, calling_ae="CT_SCANNER", called_ae="DICOMNODE")
    assert report.sent == len(files)
    with pytest.raises(AssociationFailedError):
        echo("127.0.0.1", port, calling_ae="INTRUDER", called_ae="SOMEONE_ELSE")
    assert node.sessions is not None
    sessions: sessionmaker[Session] = node.sessions

    def exported() -> bool:
        return any(
            row["outcome"] == "success" for row in audit_rows(sessions, AuditAction.OUTPUT_EXPORTED)
        )

    wait_until(exported, "the output to reach the second node")
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(node.settings.data_dir))
    runner = CliRunner()
    assert runner.invoke(app, ["studies"]).exit_code == 0
    listed = runner.invoke(app, ["audit", "--json", "--study", series.study_instance_uid])
    assert listed.exit_code == 0, listed.output

    rows = audit_rows(sessions)
    actions = {row["action"] for row in rows}
    assert actions >= {
        "association_accepted",
        "association_refused",
        "instances_stored",
        "study_completed",
        "job_ran",
        "output_exported",
        "rule_changed",
        "destination_changed",
        "phi_read",
        "audit_read",
    }
    stored = [row for row in rows if row["action"] == "instances_stored"]
    assert sum(row["count"] for row in stored) == len(files)
    assert {(row["actor"], row["study_instance_uid"]) for row in stored} == {
        ("CT_SCANNER", series.study_instance_uid)
    }
    by_study = json.loads(listed.output)
    assert {row["study_instance_uid"] for row in by_study} == {series.study_instance_uid}
    assert {"instances_stored", "study_completed", "job_ran"} <= {r["action"] for r in by_study}

    assert pacs.sessions is not None
    received = audit_rows(pacs.sessions, AuditAction.INSTANCES_STORED)
    assert received and {row["actor"] for row in received} == {node.settings.ae_title}
    text = json.dumps(rows + audit_rows(pacs.sessions)).lower()
    assert series.study_instance_uid in text  # the search does see what the rows hold
    for value in (*PATIENT_NAME.split("^"), PATIENT_ID, BIRTH_DATE):
        assert value.lower() not in text
