"""Export to a real Orthanc: delivery, Orthanc stopped mid-export, a refusing destination."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState
from dicom_node.export.queue import RetryPolicy, enqueue
from dicom_node.export.target import ExportTarget
from dicom_node.export.worker import Exporter, deliver_due
from dicom_node.synthetic import generate_series
from dicom_node.testing import OrthancProcess, free_port, running_orthanc
from tests.dicom_node.export.export_support import migrated_sessions

pytestmark = pytest.mark.interop

QUICK = RetryPolicy(base_seconds=0.2, cap_seconds=1.0)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    return path


@pytest.fixture
def sessions(tmp_path: Path, config: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'data' / 'dicom-node.db'}"  # what `--config` points at
    with migrated_sessions(url) as sessions:
        yield sessions


def write_series(directory: Path, seed: str) -> list[Path]:
    return generate_series(num_slices=5, rows=64, columns=64, uid_seed=seed).write(directory)


def uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def orthanc_uids(orthanc: OrthancProcess) -> list[str]:
    found: list[dict[str, dict[str, str]]] = orthanc.get_json("/instances?expand")  # type: ignore[assignment]
    return [item["MainDicomTags"]["SOPInstanceUID"] for item in found]


def orthanc_target(orthanc: OrthancProcess, timeout: float = 10.0) -> ExportTarget:
    return ExportTarget("pacs", "127.0.0.1", orthanc.dicom_port, orthanc.ae_title, timeout=timeout)


def rows(sessions: sessionmaker[Session]) -> list[Export]:
    with sessions() as session:
        return list(session.scalars(select(Export).order_by(Export.id)))


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "exports", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_exports_arrive_in_orthanc(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    files = write_series(tmp_path / "series", "export-orthanc-plain")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        target = orthanc_target(orthanc)
        with sessions() as session, session.begin():
            enqueue(session, target, files)
        report = deliver_due(sessions, [target])
        assert len(report.delivered) == 5 and not report.retrying
        assert sorted(orthanc_uids(orthanc)) == sorted(uids(files))
    assert all(r.state == ExportState.DELIVERED and r.attempts == 1 for r in rows(sessions))


def test_stow_rs_destination_delivers_to_orthanc_dicomweb(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    files = write_series(tmp_path / "series", "export-orthanc-stow")
    with running_orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc:
        target = ExportTarget("web", "", 0, "STOW-RS", url=f"{orthanc.url}/dicom-web")
        with sessions() as session, session.begin():
            enqueue(session, target, files)
        report = deliver_due(sessions, [target])
        assert len(report.delivered) == 5, report.errors
        assert sorted(orthanc_uids(orthanc)) == sorted(uids(files))
        # Sent again (a repeated job): Orthanc takes it, nothing is duplicated.
        with sessions() as session, session.begin():
            for row in session.scalars(select(Export)):
                row.state = ExportState.PENDING.value
        assert len(deliver_due(sessions, [target]).delivered) == 5
        assert len(orthanc_uids(orthanc)) == 5
    # Orthanc gone: every instance costs one attempt and keeps the connection error.
    with sessions() as session, session.begin():
        for row in session.scalars(select(Export)):
            row.state = ExportState.PENDING.value
    report = deliver_due(sessions, [target])
    assert len(report.retrying) == 5
    assert all("STOW-RS to http://" in error for error in report.errors.values())


def test_orthanc_stopped_during_export_then_back(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    files = write_series(tmp_path / "series", "export-orthanc-restart")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        ports = {"dicom_port": orthanc.dicom_port, "http_port": orthanc.http_port}
        # Short: after the abort, pynetdicom may wait out the DIMSE timeout on one request.
        target = orthanc_target(orthanc, timeout=3.0)
        with sessions() as session, session.begin():
            enqueue(session, target, files)

        sent: list[int | None] = []

        def stop_after_two(_export_id: int, status: int | None) -> None:
            sent.append(status)
            if len(sent) == 2:
                # Killed mid-association: a SIGTERM would let the association finish first.
                orthanc.process.kill()
                orthanc.process.wait()

        first = deliver_due(sessions, [target], on_sent=stop_after_two)
    assert sent[:2] == [0, 0]
    assert len(first.delivered) == 2 and len(first.retrying) == 3

    exporter = Exporter(sessions, [target], interval=0.05, policy=QUICK)
    exporter.start()
    try:
        # While Orthanc is down the exporter keeps trying, and each try costs an attempt.
        deadline = time.monotonic() + 20
        while not all(r.attempts >= 2 for r in rows(sessions) if r.id not in first.delivered):
            assert time.monotonic() < deadline, rows(sessions)
            time.sleep(0.05)
        down = [r for r in rows(sessions) if r.state != ExportState.DELIVERED]
        assert len(down) == 3 and any("no association" in (r.last_error or "") for r in down)

        with running_orthanc(tmp_path / "orthanc", **ports) as again:  # type: ignore[arg-type]
            deadline = time.monotonic() + 30
            while not all(r.state == ExportState.DELIVERED for r in rows(sessions)):
                assert time.monotonic() < deadline, rows(sessions)
                time.sleep(0.05)
            arrived = orthanc_uids(again)
            statistics: dict[str, int] = again.get_json("/statistics")  # type: ignore[assignment]
    finally:
        exporter.stop(timeout=30)

    assert sorted(arrived) == sorted(uids(files))  # everything, each once
    assert statistics["CountInstances"] == 5
    final = rows(sessions)
    assert len(final) == 5 and all(r.last_error is None for r in final)
    assert sorted(r.attempts for r in final)[:2] == [1, 1]
    assert all(r.attempts >= 3 for r in final if r.id not in first.delivered)


def test_refusing_destination_fails_then_retry_delivers(
    sessions: sessionmaker[Session], tmp_path: Path, config: Path
) -> None:
    files = write_series(tmp_path / "series", "export-orthanc-refused")[:2]
    wrong = ExportTarget("pacs", "127.0.0.1", free_port(), "ORTHANC", max_attempts=3, timeout=5)
    with sessions() as session, session.begin():
        enqueue(session, wrong, files)
    now = dt.datetime.now(dt.UTC)
    for _ in range(3):
        report = deliver_due(sessions, [wrong], now, policy=QUICK)
        now += dt.timedelta(seconds=2)
    assert len(report.failed) == 2

    listed = cli(config, "--json")
    assert listed.returncode == 0, listed.stderr
    exported = json.loads(listed.stdout)
    assert [row["state"] for row in exported] == ["failed", "failed"]
    assert all(row["attempts"] == 3 for row in exported)
    assert all(f"127.0.0.1:{wrong.port}" in row["last_error"] for row in exported)

    unknown = cli(config, "retry", "12345")
    assert unknown.returncode == 2 and "no export with id 12345" in unknown.stderr
    first_id = exported[0]["id"]
    retried = cli(config, "retry", str(first_id))
    assert retried.returncode == 0, retried.stderr
    assert [row["state"] for row in json.loads(cli(config, "--json").stdout)] == [
        "pending",
        "failed",
    ]

    with running_orthanc(tmp_path / "orthanc") as orthanc:
        fixed = orthanc_target(orthanc)  # same destination name, right port
        report = deliver_due(sessions, [fixed], policy=QUICK)
        assert report.delivered == [first_id]
        assert orthanc_uids(orthanc) == [exported[0]["sop_instance_uid"]]
    after = json.loads(cli(config, "--json").stdout)
    assert [(row["state"], row["attempts"]) for row in after] == [("delivered", 4), ("failed", 3)]
    assert after[0]["port"] == orthanc.dicom_port and after[0]["last_error"] is None
