"""dicom_node/testing.py: the real peers that tests and benchmarks start."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.testing import running_orthanc


@pytest.mark.interop
def test_orthanc_runs_with_tcp_nodelay_like_every_dcmtk_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orthanc's DICOM server is DCMTK: without TCP_NODELAY=1 Nagle's algorithm delays
    each C-STORE response it sends (about ten times slower ingest)."""
    monkeypatch.delenv("TCP_NODELAY", raising=False)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        environment = Path(f"/proc/{orthanc.process.pid}/environ").read_bytes().split(b"\0")
    assert b"TCP_NODELAY=1" in environment
