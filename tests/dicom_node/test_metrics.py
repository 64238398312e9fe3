"""The node's metrics, scraped over HTTP from a running node whose records come from
receiver processes and whose jobs run inline or on Dask workers: each count is what was
sent, refused, run and exported."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from db.enums import TokenRole
from db.models import Export, ExportState, Job, JobState, Output
from db.session import migrated_session
from dicom_node.api.tokens import create_token
from dicom_node.config import Settings
from dicom_node.metrics import QUEUES
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


def _settings(root: Path, pacs: Node, executor: str) -> Settings:
    """Two receiver processes; rule ``ct`` smooths each CT and sends it to the PACS and to
    ``gone`` (nothing listens: each export fails at once); rule ``broken`` runs a
    processor an admin disabled, so its job fails."""
    return local_settings(
        root,
        receiver_processes=2,
        http_port=free_port(),
        executor=executor,
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


@pytest.mark.parametrize("executor", ["inline", "dask"])
def test_the_scraped_counts_are_what_was_sent_refused_run_and_exported(
    tmp_path: Path, pacs: Node, executor: str
) -> None:
    settings = _settings(tmp_path / "node", pacs, executor)
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
