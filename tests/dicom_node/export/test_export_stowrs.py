"""The STOW-RS transport: failures the server names, and a server that is not there.

Delivery to a real DICOMweb server is tested against Orthanc (tests/interop/test_export_orthanc.py).
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.export.stowrs import failures_of, send
from dicom_node.export.target import ExportTarget
from dicom_node.scu import scan_files
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
