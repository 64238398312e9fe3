"""The STOW-RS transport: failures the server names, and a server that is not there.

Delivery to a real DICOMweb server is tested against Orthanc (tests/interop/test_export_orthanc.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.export.stowrs import failures_of, send
from dicom_node.export.target import ExportTarget
from dicom_node.scu import scan_files
from dicom_node.security.crypto import write_data_file
from dicom_node.security.keys import KeyRing
from dicom_node.testing import free_port


def test_the_failed_sop_sequence_names_the_failed_instances() -> None:
    failed = Dataset()
    failed.ReferencedSOPInstanceUID = "1.2.3.4"
    failed.FailureReason = 0xA700
    unnamed = Dataset()
    unnamed.ReferencedSOPInstanceUID = "1.2.3.5"
    response = Dataset()
    response.FailedSOPSequence = [failed, unnamed]
    assert failures_of(response) == {
        "1.2.3.4": "STOW-RS failure reason 0xA700",
        "1.2.3.5": "STOW-RS failure reason unknown",
    }
    assert failures_of(Dataset()) == {}
    assert failures_of(None) == {}  # a server that answered with no body


def test_an_unreachable_server_fails_every_file(series_files: list[Path]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    target = ExportTarget("web", url, 0, "STOW-RS", url=url, timeout=5.0)
    files, _ = scan_files(series_files)
    outcomes = send(target, files, None)
    assert set(outcomes) == set(series_files)
    for result in outcomes.values():
        assert not result.delivered
        assert (result.error or "").startswith(f"STOW-RS to {url}: ConnectionError")


def test_encrypted_files_are_sent_as_their_plaintext(
    series_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomweb_client.api import DICOMwebClient

    keys = KeyRing.generate()
    encrypted = []
    for path in series_files:
        encrypted.append(tmp_path / path.name)
        write_data_file(encrypted[-1], path.read_bytes(), keys)
    sent: list[Dataset] = []

    def store_instances(self: DICOMwebClient, datasets: list[Dataset]) -> None:
        sent.extend(datasets)

    monkeypatch.setattr(DICOMwebClient, "store_instances", store_instances)
    target = ExportTarget("web", "http://127.0.0.1:1/dicom-web", 0, "STOW-RS", url="http://x/")
    files, skipped = scan_files(encrypted, keys)
    assert not skipped
    outcomes = send(target, files, None)
    assert all(outcome.delivered for outcome in outcomes.values())
    assert sent == [dcmread(path) for path in series_files]
