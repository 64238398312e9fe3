"""Two kinds of destination through a real node: ``reply_to_sender`` (the outputs go back
to the AE that sent the study: DCMTK's storescu sends, a storescp listens for the reply)
and a DICOMweb server (STOW-RS to Orthanc's DICOMweb plugin). Each gets every output
once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pydicom
import pytest
from node_rows import exports, jobs, node_sessions, wait_until
from orchestration_support import orthanc_instances

from db.models import Export, ExportState, Job, JobState
from dicom_node.synthetic import generate_series
from dicom_node.testing import running_orthanc, running_storescp, start_node, storescu

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SLICES = 4


def test_outputs_go_back_to_the_sender_and_by_stow_rs_to_orthanc_once_each(
    tmp_path: Path,
) -> None:
    replies = tmp_path / "replies"
    with (
        running_orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc,
        running_storescp(replies, extra_args=["+uf"]) as scanner_port,
    ):
        config = tmp_path / "node.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                study_quiet_seconds = 1.0
                executor = "inline"
                receiver_processes = 1

                # The sender: outputs for a study it sent go back to it (reply_to_sender).
                [[destinations]]
                name = "scanner"
                host = "127.0.0.1"
                port = {scanner_port}
                ae_title = "SCANNER"

                [[destinations]]
                name = "web"
                url = "{orthanc.url}/dicom-web"

                [[rules]]
                name = "denoise"
                match = {{ Modality = "CT" }}
                pipeline = ["gaussian"]
                destinations = ["web"]
                reply_to_sender = true
                """
            )
        )
        node = start_node(tmp_path / "data", config=config)
        try:
            files = generate_series(num_slices=SLICES, rows=32, columns=32, uid_seed="reply").write(
                tmp_path / "series"
            )
            sent = storescu(files, node.port, calling_ae="SCANNER", called_ae="DICOMNODE")
            assert sent.returncode == 0, sent.stderr
            with node_sessions(node.database_url) as sessions:
                [job] = wait_until(lambda: jobs(sessions), succeeded, "the job succeeds")
                assert job.destinations == ["web", "scanner"]
                rows = wait_until(lambda: exports(sessions), delivered, "exports delivered")
        finally:
            node.stop()
        outputs = {row.sop_instance_uid for row in rows}
        assert len(outputs) == job.num_outputs == SLICES  # the derived series
        assert sorted((row.destination, row.host) for row in rows) == sorted(
            [("scanner", "127.0.0.1")] * SLICES + [("web", f"{orthanc.url}/dicom-web")] * SLICES
        )

        received = [pydicom.dcmread(path, stop_before_pixels=True) for path in replies.iterdir()]
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(outputs)

        assert set(orthanc_instances(orthanc)) == outputs
        assert orthanc.get_json("/statistics")["CountInstances"] == SLICES  # type: ignore[index]


def succeeded(found: list[Job]) -> bool:
    return len(found) == 1 and found[0].state is JobState.SUCCEEDED


def delivered(found: list[Export]) -> bool:
    return len(found) == 2 * SLICES and all(e.state is ExportState.DELIVERED for e in found)
