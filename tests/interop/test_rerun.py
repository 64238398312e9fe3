"""A study that completes again while its job runs, through a real node (Dask executor) and
a real Orthanc: the job runs again after the first run, on the whole series, and Orthanc
ends with both runs' outputs, each once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gated_plugin import gated_plugin_env, gated_rule
from node_rows import exports, jobs, node_sessions, wait_until
from orchestration_support import orthanc_instances, write_config

from db.models import Export, ExportState, Job, JobState
from dicom_node.synthetic import generate_series
from dicom_node.testing import NodeProcess, running_orthanc, start_node, storescu

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def running(found: list[Job]) -> bool:
    return len(found) == 1 and found[0].state is JobState.RUNNING


def rerun_asked(found: list[Job]) -> bool:
    return running(found) and found[0].rerun_requested


def succeeded(found: list[Job]) -> bool:
    return len(found) == 1 and found[0].state is JobState.SUCCEEDED


def delivered(found: list[Export]) -> bool:
    return len(found) == 10 and all(e.state is ExportState.DELIVERED for e in found)


def submissions(node: NodeProcess, job_id: object) -> int:
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    return sum(1 for e in lines if e.get("event") == "job submitted" and e["job_id"] == job_id)


def test_more_slices_while_the_job_runs_make_it_run_again_after(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    series = generate_series(num_slices=6, rows=32, columns=32, uid_seed="grows-while-running")
    files = series.write(tmp_path / "series")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        config = write_config(
            tmp_path / "node.toml",
            orthanc,
            gated_rule(gate),
            study_quiet_seconds=1.0,
            dask_workers=1,
            receiver_processes=1,
        )
        env = gated_plugin_env(tmp_path / "plugins")
        node = start_node(tmp_path / "data", config=config, env=env)
        try:
            with node_sessions(node.database_url) as sessions:
                assert storescu(files[:4], node.port, called_ae="DICOMNODE").returncode == 0
                [first] = wait_until(lambda: jobs(sessions), running, "the job runs")
                assert storescu(files[4:], node.port, called_ae="DICOMNODE").returncode == 0
                wait_until(lambda: jobs(sessions), rerun_asked, "a rerun is asked")
                gate.touch()  # the first run ends; the second one passes the gate at once
                [job] = wait_until(lambda: jobs(sessions), succeeded, "the job succeeds")
                assert (job.id, job.attempts, job.num_outputs) == (first.id, 1, 6)
                assert not job.rerun_requested
                assert submissions(node, job.id) == 2  # one run after the other, not three
                sent = wait_until(lambda: exports(sessions), delivered, "exports delivered")
            uids = {e.sop_instance_uid for e in sent}
            stored = orthanc_instances(orthanc)
            assert set(stored) == uids and len(uids) == len(sent) == 4 + 6
            assert orthanc.get_json("/statistics")["CountInstances"] == 10  # type: ignore[index]
            by_series: dict[str, int] = {}
            for instance in stored.values():
                series_id = instance["ParentSeries"]
                by_series[series_id] = by_series.get(series_id, 0) + 1
            assert sorted(by_series.values()) == [4, 6]  # the first run's series stays
        finally:
            node.stop()
