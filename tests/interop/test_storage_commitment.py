"""Storage commitment with a real Orthanc: it knows the node as a modality, answers the
node's N-ACTION with an N-EVENT-REPORT on an association of its own, and the exports end
``committed``; an instance Orthanc lost is reported failed, sent again and committed."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from db.models import AuditAction, AuditEvent, AuditOutcome, ExportState
from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.export.queue import enqueue
from dicom_node.export.target import export_target
from dicom_node.node import Node
from dicom_node.synthetic import generate_series
from dicom_node.testing import OrthancProcess, free_port, local_settings, running_orthanc
from tests.dicom_node.export.export_support import exports_of, running, wait_for

pytestmark = pytest.mark.interop

NODE_AE = "COMMITNODE"


@contextmanager
def orthanc_and_node(
    tmp_path: Path, receiver_processes: int = 1
) -> Iterator[tuple[OrthancProcess, Settings]]:
    """An Orthanc that knows the node (``DicomModalities``) and the node's settings: one
    destination, ``pacs``, with storage commitment (the node is not started)."""
    node_port, orthanc_port = free_port(), free_port()
    modalities = {"node": {"AET": NODE_AE, "Host": "127.0.0.1", "Port": node_port}}
    with running_orthanc(
        tmp_path / "orthanc",
        dicom_port=orthanc_port,
        extra_config={"DicomModalities": modalities},
    ) as orthanc:
        destination = {
            "name": "pacs",
            "host": "127.0.0.1",
            "port": orthanc_port,
            "ae_title": orthanc.ae_title,
            "storage_commitment": True,
            "commitment_timeout": 30.0,
            "timeout": 10.0,
        }
        settings = local_settings(
            tmp_path,
            port=node_port,
            ae_title=NODE_AE,
            destinations=[destination],
            receiver_processes=receiver_processes,
        )
        yield orthanc, settings


def all_committed(node: Node) -> bool:
    return all(row.state == ExportState.COMMITTED for row in exports_of(node))


def exports_json(settings: Settings, tmp_path: Path) -> list[dict[str, object]]:
    """What ``dicom-node exports --json`` prints for the node's data folder."""
    config = tmp_path / "node.toml"
    config.write_text(f"data_dir = {json.dumps(str(settings.data_dir))}\n")
    listed = CliRunner().invoke(app, ["exports", "--json", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    found: list[dict[str, object]] = json.loads(listed.stdout)
    return found


def enqueue_series(node: Node, settings: Settings, directory: Path, seed: str) -> None:
    files = generate_series(num_slices=3, rows=32, columns=32, uid_seed=seed).write(directory)
    assert node.sessions is not None and node.exporter is not None
    with node.sessions.begin() as session:
        enqueue(session, export_target(settings.destinations[0], settings.ae_title), files)
    node.exporter.wake()


def test_exports_to_orthanc_end_committed(tmp_path: Path) -> None:
    # Two receiver processes: the report crosses their pipe to the node's indexer.
    with orthanc_and_node(tmp_path, 2) as (_orthanc, settings), running(settings) as node:
        enqueue_series(node, settings, tmp_path / "series", "commitment-orthanc")
        wait_for("Orthanc's storage commitment report", lambda: all_committed(node))
        listed = exports_json(settings, tmp_path)
    assert [row["state"] for row in listed] == ["committed"] * 3
    assert all(row["committed_at"] and row["commitment_uid"] for row in listed)
    assert {row["commitment_uid"] for row in listed} == {listed[0]["commitment_uid"]}
    assert [row["attempts"] for row in listed] == [1, 1, 1]


def orthanc_delete_instance(orthanc: OrthancProcess, sop_instance_uid: str) -> None:
    request = urllib.request.Request(
        f"{orthanc.url}/tools/lookup", data=sop_instance_uid.encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        [found] = json.load(answer)
    delete = urllib.request.Request(f"{orthanc.url}{found['Path']}", method="DELETE")
    urllib.request.urlopen(delete, timeout=30).close()


def test_an_instance_orthanc_lost_is_sent_again_and_committed(tmp_path: Path) -> None:
    with orthanc_and_node(tmp_path) as (orthanc, settings):
        # Delivered by a node that had no storage commitment yet; then Orthanc loses one.
        plain = settings.model_copy(
            update={
                "destinations": [
                    settings.destinations[0].model_copy(update={"storage_commitment": False})
                ]
            }
        )
        with running(plain) as node:
            enqueue_series(node, plain, tmp_path / "series", "commitment-orthanc-lost")
            wait_for(
                "delivery",
                lambda: all(row.state == ExportState.DELIVERED for row in exports_of(node)),
            )
        lost = exports_of(node)[1].sop_instance_uid
        orthanc_delete_instance(orthanc, lost)

        with running(settings) as node:
            wait_for("commitment after the re-send", lambda: all_committed(node))
            final = {row.sop_instance_uid: row for row in exports_of(node)}
            assert node.sessions is not None
            with node.sessions() as session:
                audited = [
                    (event.sop_instance_uid, event.outcome, event.reason)
                    for event in session.scalars(
                        select(AuditEvent)
                        .where(AuditEvent.action == AuditAction.STORAGE_COMMITMENT)
                        .order_by(AuditEvent.id)
                    )
                ]
        in_orthanc = orthanc.get_json("/instances?expand")
    assert final[lost].attempts == 2  # sent twice
    assert [row.attempts for uid, row in final.items() if uid != lost] == [1, 1]
    assert lost in {item["MainDicomTags"]["SOPInstanceUID"] for item in in_orthanc}  # type: ignore[index,union-attr]
    retried = [a for a in audited if a[1] == AuditOutcome.RETRYING]
    assert retried == [
        (lost, AuditOutcome.RETRYING, "not committed by the PACS: 0x0112 (no such object instance)")
    ]
    assert sorted(a[0] for a in audited if a[1] == AuditOutcome.SUCCESS) == sorted(final)
