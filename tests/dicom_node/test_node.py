"""The node in-process: what it leaves behind in the process that runs it; the whole loop
with encryption at rest."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config
from sqlalchemy import select

from db.models import Export, ExportState, Instance, Job, JobState
from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.scu import scan_files, send
from dicom_node.security.crypto import read_dicom
from dicom_node.security.keys import KeyRing, write_key_file
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings


def _library_switches() -> tuple[object, ...]:
    return (
        config.settings.reading_validation_mode,
        config.settings.writing_validation_mode,
        _config.UNRESTRICTED_STORAGE_SERVICE,
    )


def test_a_running_node_leaves_process_wide_library_switches_alone(settings: Settings) -> None:
    before = _library_switches()
    node = Node(settings)
    node.start()
    try:
        assert _library_switches() == before
    finally:
        node.stop(1)
    assert _library_switches() == before


PATIENT_NAME = "Hidden^Patience"
PATIENT_ID = "ID-ENCRYPTED-42"
DIMENSION_ORGANIZATION_UID = "00209164"  # highdicom makes a new one each time


def _without_encoding_times(element: object) -> object:
    """A dataset as DICOM JSON without what differs between two encodings of the same
    input: dates and times, and the SEG's dimension organization UID."""
    if isinstance(element, dict):
        return {
            tag: _without_encoding_times(value)
            for tag, value in element.items()
            if tag != DIMENSION_ORGANIZATION_UID
            and not (isinstance(value, dict) and value.get("vr") in ("DA", "TM", "DT"))
        }
    if isinstance(element, list):
        return [_without_encoding_times(item) for item in element]
    return element


def _flow_settings(root: Path, pacs: Node, key_file: Path | None) -> Settings:
    """A node that runs gaussian + threshold_segment on every CT and sends the outputs
    to ``pacs`` (a node in clear), quick to notice a complete study."""
    return local_settings(
        root,
        spool_encryption_key_file=key_file,
        study_quiet_seconds=0.3,
        assembler_interval_seconds=0.1,
        dispatcher_interval_seconds=0.05,
        destinations=[
            {"name": "pacs", "host": "127.0.0.1", "port": pacs.settings.port, "ae_title": "PACS"}
        ],
        rules=[
            {
                "name": "ct",
                "match": {"Modality": "CT"},
                "pipeline": ["gaussian", "threshold_segment"],
                "destinations": ["pacs"],
            }
        ],
    )


def _delivered(node: Node, timeout: float = 90.0) -> list[Export]:
    assert node.sessions is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with node.sessions() as session:
            exports = list(session.scalars(select(Export)))
            failed = session.scalars(select(Job).where(Job.state == JobState.FAILED)).first()
        assert failed is None, failed.error
        if exports and all(e.state is ExportState.DELIVERED for e in exports):
            return exports
        time.sleep(0.1)
    raise AssertionError(f"exports not delivered: {[(e.state, e.last_error) for e in exports]}")


def _received(pacs: Node) -> dict[str, Dataset]:
    """What the PACS holds, by SOP Instance UID."""
    datasets = [dcmread(path) for path in pacs.settings.spool_dir.rglob("*.dcm")]
    return {str(dataset.SOPInstanceUID): dataset for dataset in datasets}


def _send_through(root: Path, series_dir: Path, key_file: Path | None) -> dict[str, Dataset]:
    """Receive the series, process it, export the outputs: what the PACS received."""
    pacs = Node(local_settings(root / "pacs", ae_title="PACS"))
    pacs.start()
    node = Node(_flow_settings(root, pacs, key_file))
    node.start()
    try:
        files, _ = scan_files([series_dir])
        report = send(
            files, "127.0.0.1", node.settings.port, calling_ae="CT", called_ae="DICOMNODE"
        )
        assert report.sent == len(files)
        exports = _delivered(node)
    finally:
        node.stop(1)
        pacs.stop(1)
    received = _received(pacs)
    assert {e.sop_instance_uid for e in exports} == set(received)
    return received


def _files_holding(root: Path, needles: tuple[bytes, ...]) -> list[Path]:
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and any(needle in path.read_bytes() for needle in needles)
    ]


def test_a_node_with_a_key_file_keeps_no_patient_data_in_clear_and_sends_plaintext(
    tmp_path: Path,
) -> None:
    """The whole loop with encryption on: the PACS gets the same DICOM as from a node in
    clear, no file in the data folder holds the patient's name or ID, and after the key
    is rotated (new key first, old kept) and the index lost, the node re-indexes and reads
    everything it wrote."""
    series = generate_series(
        num_slices=6,
        rows=48,
        columns=48,
        uid_seed="at-rest",
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
    )
    series_dir = tmp_path / "series"
    series.write(series_dir)
    old_key, new_key = KeyRing.generate().keys[0], KeyRing.generate().keys[0]
    write_key_file(tmp_path / "key", [old_key])

    in_clear = _send_through(tmp_path / "clear", series_dir, None)
    encrypted = _send_through(tmp_path / "encrypted", series_dir, tmp_path / "key")
    assert encrypted.keys() == in_clear.keys() and len(encrypted) > len(series.datasets)
    for uid, dataset in encrypted.items():
        assert _without_encoding_times(dataset.to_json_dict()) == _without_encoding_times(
            in_clear[uid].to_json_dict()
        )
    assert PATIENT_NAME in {str(ds.PatientName) for ds in encrypted.values()}

    data_dir = tmp_path / "encrypted" / "data"
    needles = (PATIENT_NAME.encode(), PATIENT_ID.encode())
    assert _files_holding(data_dir, needles) == []
    assert _files_holding(tmp_path / "clear" / "data", needles) != []  # the search can find

    for stale in data_dir.glob("dicom-node.db*"):
        stale.unlink()
    write_key_file(tmp_path / "rotated", [new_key, old_key])
    settings = local_settings(
        tmp_path / "encrypted", spool_encryption_key_file=tmp_path / "rotated"
    )
    node = Node(settings)
    node.start()
    try:
        assert node.sessions is not None
        with node.sessions() as session:
            paths = list(session.scalars(select(Instance.path)))
    finally:
        node.stop(1)
    assert len(paths) == len(series.datasets)
    rotated = KeyRing.from_file(tmp_path / "rotated")
    written = [p for p in data_dir.rglob("*.dcm")]
    assert len(written) == len(series.datasets) + len(encrypted)
    readable = {str(read_dicom(path, rotated).SOPInstanceUID): path for path in written}
    for uid, dataset in encrypted.items():  # the PACS got exactly the outputs' plaintext
        assert read_dicom(readable[uid], rotated) == dataset
