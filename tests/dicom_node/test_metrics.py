"""The node's metrics, scraped over HTTP from a running node whose records come from
receiver processes and whose jobs run inline or on Dask workers: each count is what was
sent, refused, run and exported."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from db.enums import TokenRole
from db.models import (
    Export,
    ExportState,
    Job,
    JobState,
    Output,
    OutputKind,
    Series,
    Study,
    StudyStatus,
)
from db.session import make_engine, make_sessionmaker, migrated_session, upgrade
from dicom_node.api.tokens import create_token
from dicom_node.config import Settings
from dicom_node.export.queue import DeliveryReport
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import InlineExecutor
from dicom_node.metrics import QUEUES, NodeMetrics
from dicom_node.node import Node
from dicom_node.plugin_state import set_state
from dicom_node.scu import scan_files, send
from dicom_node.security.audit import Actor
from dicom_node.synthetic import generate_series
from dicom_node.testing import free_port, local_settings

SLICES = 4
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Node]:
    receiving = Node(local_settings(tmp_path / "pacs", ae_title="PACS"))
    receiving.start()
    try:
        yield receiving
    finally:
        receiving.stop(1)


def _settings(root: Path, pacs: Node) -> Settings:
    """Two receiver processes; rule ``ct`` smooths each CT and sends it to the PACS and to
    ``gone`` (nothing listens: each export fails at once); rule ``broken`` runs a
    processor an admin disabled, so its job fails."""
    return local_settings(
        root,
        receiver_processes=2,
        http_port=free_port(),
        executor="dask",
        dask_workers=1,
        require_called_ae_title=True,
        study_quiet_seconds=0.3,
        assembler_interval_seconds=0.1,
        dispatcher_interval_seconds=0.05,
        job_max_attempts=1,
        destinations=[
            {"name": "pacs", "host": "127.0.0.1", "port": pacs.settings.port, "ae_title": "PACS"},
            {"name": "gone", "host": "127.0.0.1", "port": free_port(), "max_attempts": 1},
        ],
        rules=[
            {
                "name": "ct",
                "match": {"Modality": "CT"},
                "pipeline": ["gaussian"],
                "destinations": ["pacs", "gone"],
            },
            {"name": "broken", "match": {"Modality": "CT"}, "pipeline": ["median"]},
        ],
    )


def _viewer_token(settings: Settings) -> str:
    with migrated_session(settings.effective_database_url) as session:
        set_state(session, "median", enabled=False)
        return create_token(session, "scraper", TokenRole.VIEWER, Actor.os_user())


def _refused_association(settings: Settings) -> None:
    ae = AE(ae_title="CT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="NOT-THIS-NODE")
    assert assoc.is_rejected


def _scrape(url: str, token: str) -> Samples:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _node_samples(url: str, token: str) -> Samples:
    return {key: value for key, value in _scrape(url, token).items() if "dicom_node" in key[0]}


def _settled(node: Node, url: str, token: str, timeout: float = 60.0) -> Samples:
    """The scrape once the study's turnaround is observed (both jobs ended, every export
    delivered or failed) and the counts no longer move (the exporter counts its round
    just after recording it, while the dispatcher may see the study settle)."""
    deadline = time.monotonic() + timeout
    previous: Samples = {}
    while time.monotonic() < deadline:
        samples = _node_samples(url, token)
        turnarounds = _value(samples, "dicom_node_study_turnaround_seconds_count")
        if turnarounds >= 1 and samples == previous:
            return samples
        previous = samples if turnarounds >= 1 else {}
        time.sleep(0.3)
    assert node.sessions is not None
    with node.sessions() as session:
        jobs = [(j.rule_name, j.state, j.error) for j in session.scalars(select(Job))]
        exports = [(e.destination, e.state) for e in session.scalars(select(Export))]
    raise AssertionError(f"not settled: jobs {jobs}, exports {exports}")


def test_the_scraped_counts_are_what_was_sent_refused_run_and_exported(
    tmp_path: Path, pacs: Node
) -> None:
    """Dask: the processor's timings come from a worker process (the inline executor
    runs the same dispatcher code in the node's process)."""
    settings = _settings(tmp_path / "node", pacs)
    token = _viewer_token(settings)
    series = generate_series(num_slices=SLICES, rows=32, columns=32, uid_seed="metrics")
    series.write(tmp_path / "series")
    files, _ = scan_files([tmp_path / "series"])
    node = Node(settings)
    node.start()
    try:
        assert node.api is not None
        anonymous = httpx.get(f"{node.api.url}/metrics")
        assert anonymous.status_code == 401
        started = time.monotonic()
        _refused_association(settings)
        report = send(files, "127.0.0.1", settings.port, calling_ae="CT", called_ae="DICOMNODE")
        assert report.sent == SLICES
        samples = _settled(node, node.api.url, token)
        elapsed = time.monotonic() - started
        assert node.sessions is not None
        with node.sessions() as session:
            jobs = {j.rule_name: j.state for j in session.scalars(select(Job))}
            outputs = len(session.scalars(select(Output.id)).all())
            exports = {(e.destination, e.state) for e in session.scalars(select(Export))}
    finally:
        node.stop(1)

    assert jobs == {"ct": JobState.SUCCEEDED, "broken": JobState.FAILED}
    assert outputs == SLICES
    assert exports == {("pacs", ExportState.DELIVERED), ("gone", ExportState.FAILED)}
    spooled = [p for p in settings.spool_dir.rglob("*.dcm")]
    assert len(spooled) == SLICES

    def value(name: str, **labels: str) -> float:
        return _value(samples, f"dicom_node_{name}", **labels)

    counts = {
        ("instances_received_total",): SLICES,
        ("bytes_received_total",): sum(path.stat().st_size for path in spooled),
        ("associations_total", "result=accepted"): 1,
        ("associations_total", "result=rejected"): 1,
        ("jobs_total", "rule=ct", "state=succeeded"): 1,
        ("jobs_total", "rule=ct", "state=failed"): 0,
        ("jobs_total", "rule=broken", "state=failed"): 1,
        ("job_duration_seconds_count", "rule=ct"): 1,
        ("job_duration_seconds_count", "rule=broken"): 1,
        ("processor_duration_seconds_count", "processor=gaussian"): 1,
        ("processor_duration_seconds_count", "processor=median"): 0,
        ("exports_total", "destination=pacs", "result=delivered"): SLICES,
        ("exports_total", "destination=gone", "result=failed"): SLICES,
        ("exports_total", "destination=gone", "result=delivered"): 0,
        ("study_turnaround_seconds_count",): 1,
        **{("queue_depth", f"queue={queue}"): 0 for queue in QUEUES},
    }
    scraped = {key: value(key[0], **dict(label.split("=") for label in key[1:])) for key in counts}
    assert scraped == counts
    assert 0 < value("job_duration_seconds_sum", rule="ct") < elapsed
    assert 0 < value("processor_duration_seconds_sum", processor="gaussian") < elapsed
    assert 0 < value("study_turnaround_seconds_sum") < elapsed
    queues = {dict(labels)["queue"] for name, labels in samples if name.endswith("queue_depth")}
    assert queues == set(QUEUES)


def _parsed(metrics: NodeMetrics) -> Samples:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_answers_while_the_database_does_not(tmp_path: Path) -> None:
    unreachable = tmp_path / "no-such-folder" / "node.db"
    sessions = sessionmaker(create_engine(f"sqlite:///{unreachable}"))
    samples = _parsed(NodeMetrics(sessions, index_backlog=lambda: 7))
    depths = {labels: v for (name, labels), v in samples.items() if "queue_depth" in name}
    assert depths == {(("queue", "index"),): 7}
    assert _value(samples, "dicom_node_instances_received_total") == 0


T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def _study_with_an_output(session: Session) -> tuple[Study, Job, Export]:
    """A study received at T0 whose one job ran and whose one output is being sent."""
    study = Study(
        study_instance_uid="1.2.3",
        status=StudyStatus.COMPLETE,
        first_received_at=T0,
        last_received_at=T0,
    )
    session.add(study)
    session.flush()
    series = Series(series_instance_uid="1.2.3.1", study_id=study.id)
    session.add(series)
    session.flush()
    job = Job(
        study_id=study.id,
        series_id=series.id,
        series_instance_uid=series.series_instance_uid,
        rule_name="ct",
        pipeline=["gaussian"],
        params={},
        destinations=["pacs"],
        state=JobState.RUNNING,
        attempts=1,
        max_attempts=1,
        not_before=T0,
        started_at=T0,
    )
    session.add(job)
    session.flush()
    output = Output(
        sop_instance_uid="1.2.3.9.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        kind=OutputKind.DERIVED,
        path="/nowhere",
        series_instance_uid="1.2.3.9",
        source_series_uid=series.series_instance_uid,
        processor_name="gaussian",
        processor_version="1",
        params={},
        job_id=job.id,
    )
    session.add(output)
    session.flush()
    export = Export(
        destination="pacs",
        host="127.0.0.1",
        port=104,
        ae_title="PACS",
        sop_instance_uid=output.sop_instance_uid,
        sop_class_uid=output.sop_class_uid,
        path=output.path,
        state=ExportState.SENDING,
        max_attempts=3,
        next_attempt_at=T0,
        output_id=output.id,
    )
    session.add(export)
    session.flush()
    return study, job, export


def test_a_study_s_turnaround_is_observed_once_when_it_settles(tmp_path: Path) -> None:
    """Not while its job runs or its output is being sent; once both are done, from its
    last instance to its last delivery, whichever hook sees it first; again when the
    study is received again and settles again."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    metrics = NodeMetrics(sessions)

    def turnarounds() -> tuple[float, float]:
        samples = _parsed(metrics)
        return (
            _value(samples, "dicom_node_study_turnaround_seconds_count"),
            _value(samples, "dicom_node_study_turnaround_seconds_sum"),
        )

    with sessions.begin() as session:
        study, job, export = _study_with_an_output(session)
    metrics.job_ended(job, JobState.SUCCEEDED)  # its own row still says running
    assert turnarounds() == (0, 0)
    with sessions.begin() as session:
        session.get_one(Job, job.id).state = JobState.SUCCEEDED
    metrics.job_ended(job, JobState.SUCCEEDED)  # the export is still being sent
    assert turnarounds() == (0, 0)
    with sessions.begin() as session:
        row = session.get_one(Export, export.id)
        row.state, row.delivered_at = ExportState.DELIVERED, T0 + dt.timedelta(seconds=42)
    report = DeliveryReport(delivered=[export.id], destinations={export.id: "pacs"})
    metrics.exports_recorded(report)
    metrics.job_ended(job, JobState.SUCCEEDED)
    assert turnarounds() == (1, 42)
    with sessions.begin() as session:  # received again 100 s later, delivered again
        session.get_one(Study, study.id).last_received_at = T0 + dt.timedelta(seconds=100)
        session.get_one(Export, export.id).delivered_at = T0 + dt.timedelta(seconds=110)
    metrics.exports_recorded(report)
    assert turnarounds() == (2, 52)
    samples = _parsed(metrics)
    assert _value(samples, "dicom_node_exports_total", destination="pacs", result="delivered") == 2
    engine.dispose()


def test_receiver_processes_import_no_metrics_code() -> None:
    """They count nothing themselves: their records are counted in the node's process."""
    check = "import sys, dicom_node.receiver; print('prometheus_client' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_a_failure_is_counted_only_when_it_is_recorded(tmp_path: Path) -> None:
    """A job an operator cancelled while it ran is not counted as failed when its run
    ends; one still running is."""
    settings = local_settings(tmp_path)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    sessions = make_sessionmaker(engine)
    metrics = NodeMetrics(sessions)
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(), None, metrics)
    with sessions.begin() as session:
        _, job, _ = _study_with_an_output(session)
        session.get_one(Job, job.id).state = JobState.CANCELLED
    dispatcher._failed(job.id, "the worker died")
    assert _value(_parsed(metrics), "dicom_node_jobs_total", rule="ct", state="failed") == 0
    with sessions.begin() as session:
        session.get_one(Job, job.id).state = JobState.RUNNING
    dispatcher._failed(job.id, "the worker died")
    assert _value(_parsed(metrics), "dicom_node_jobs_total", rule="ct", state="failed") == 1
    engine.dispose()
