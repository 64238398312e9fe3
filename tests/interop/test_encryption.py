"""End to end with encryption at rest: storescu -> node (receiver processes, Dask worker)
-> SEG and derived series in a real Orthanc, which receives the plaintext DICOM; nothing in
the node's data folder holds the patient's name; after the key file is rotated, a restarted
node still reads, processes and sends what it stored."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from orchestration_support import (
    orthanc_instances,
    run_cli,
    wait_for_exports,
    wait_for_jobs,
    write_config,
)

from dicom_node.security.crypto import MAGIC, read_dicom
from dicom_node.security.keys import KeyRing, write_key_file
from dicom_node.synthetic import generate_series
from dicom_node.testing import NodeProcess, OrthancProcess, running_orthanc, start_node, storescu

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PATIENT_NAME = "Cipher^Constance"
RULE = """
[[rules]]
name = "ct"
match = { Modality = "CT" }
pipeline = ["gaussian", "threshold_segment"]
destinations = ["pacs"]
"""


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def send_ct(tmp_path: Path, port: int, name: str) -> list[Path]:
    series = generate_series(
        num_slices=8, rows=64, columns=64, uid_seed=name, patient_name=PATIENT_NAME
    )
    files = series.write(tmp_path / name)
    result = storescu(files, port, called_ae="DICOMNODE")
    assert result.returncode == 0, result.stderr
    return files


def start(tmp_path: Path, orthanc: OrthancProcess, key_file: Path) -> NodeProcess:
    config = write_config(
        tmp_path / "node.toml",
        orthanc,
        RULE,
        spool_encryption_key_file=str(key_file),
        study_quiet_seconds=1.0,
        dask_workers=1,
        receiver_processes=2,
    )
    return start_node(tmp_path / "data", config=config, timeout=90)


def orthanc_file(orthanc: OrthancProcess, orthanc_id: str) -> bytes:
    with urllib.request.urlopen(f"{orthanc.url}/instances/{orthanc_id}/file", timeout=30) as r:
        data: bytes = r.read()
    return data


def test_an_encrypting_node_sends_plaintext_and_keeps_no_name_in_clear(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    old, new = KeyRing.generate().keys[0], KeyRing.generate().keys[0]
    key_file = tmp_path / "keys"
    write_key_file(key_file, [old])
    node = start(tmp_path, orthanc, key_file)
    try:
        send_ct(tmp_path, node.port, "first")
        [job] = wait_for_jobs(node, 1, ("succeeded", "failed"))
        assert job["state"] == "succeeded", job
        exports = wait_for_exports(node)
        assert {e["state"] for e in exports} == {"delivered"}
    finally:
        node.stop()

    data_dir = tmp_path / "data"
    grep = subprocess.run(["grep", "-r", "-l", PATIENT_NAME, str(data_dir)], capture_output=True)
    assert grep.returncode == 1, grep.stdout  # 1: no match
    spooled = list(data_dir.rglob("*.dcm"))
    assert len(spooled) == 8 + len(exports)
    assert all(path.read_bytes().startswith(MAGIC) for path in spooled)

    ring = KeyRing.from_file(key_file)
    written = {str(read_dicom(path, ring).SOPInstanceUID): path for path in spooled}
    stored = orthanc_instances(orthanc)
    assert set(stored) == {e["sop_instance_uid"] for e in exports}
    for uid, item in stored.items():  # the PACS got exactly the plaintext of the outputs
        received = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc_file(orthanc, item["ID"])))
        assert received == read_dicom(written[uid], ring)
        assert str(received.PatientName) == PATIENT_NAME

    key_file.unlink()
    write_key_file(key_file, [new, old])  # rotated: the new key first, the old one kept
    node = start(tmp_path, orthanc, key_file)
    try:
        retried = run_cli(node, "jobs", "retry", str(job["id"]))
        assert retried.returncode == 0, retried.stderr
        time.sleep(0.5)
        [again] = wait_for_jobs(node, 1, ("succeeded", "failed"), timeout=180)
        assert again["state"] == "succeeded" and again["finished_at"] != job["finished_at"]
    finally:
        node.stop()
    only_new = KeyRing((new,))  # the series read under the old key, its outputs rewritten
    rewritten = [read_dicom(path, only_new) for path in (data_dir / "outputs").rglob("*.dcm")]
    assert {str(dataset.SOPInstanceUID) for dataset in rewritten} == set(stored)  # the new one
