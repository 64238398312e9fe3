"""End to end: storescu -> node (Dask executor) -> jobs -> SEG/SR/derived in a real Orthanc.

Also the faults (a plugin that raises, hangs, or kills its worker) and a kill -9 of the
node in the middle of a job.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from orchestration_support import (
    cli_json,
    dciodvfy_errors,
    install_test_plugins,
    orthanc_instances,
    plugin_env,
    wait_for_exports,
    wait_for_jobs,
    write_config,
)

from dicom_node.synthetic import generate_series
from dicom_node.testing import (
    OrthancProcess,
    echoscu,
    running_orthanc,
    start_node,
    storescu,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

CT_DEFAULT = """
[[rules]]
name = "ct-default"
match = { Modality = "CT" }
pipeline = ["gaussian", "threshold_segment", "kmeans", "features"]
destinations = ["pacs"]
"""


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def send_ct(tmp_path: Path, port: int, name: str, **kwargs: object) -> list[Path]:
    series = generate_series(num_slices=24, rows=96, columns=96, uid_seed=name, **kwargs)  # type: ignore[arg-type]
    files = series.write(tmp_path / name)
    storescu(files, port, called_ae="DICOMNODE")
    return files


def download(orthanc: OrthancProcess, orthanc_id: str, path: Path) -> Path:
    with urllib.request.urlopen(f"{orthanc.url}/instances/{orthanc_id}/file", timeout=30) as r:
        path.write_bytes(r.read())
    return path


def test_study_from_storescu_reaches_orthanc_as_seg_sr_and_derived(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    config = write_config(
        tmp_path / "node.toml",
        orthanc,
        CT_DEFAULT,
        study_quiet_seconds=1.0,
        dask_workers=2,
        receiver_processes=1,
    )
    node = start_node(tmp_path / "data", config=config)
    try:
        sources = send_ct(tmp_path, node.port, "e2e")
        [job] = wait_for_jobs(node, 1, ("succeeded", "failed"))
        assert job["state"] == "succeeded", job
        assert job["worker"].startswith("tcp://127.0.0.1:"), job["worker"]
        steps = [step["step"] for step in job["step_timings"]]
        assert steps[0] == "load" and "features:encode" in steps
        exports = wait_for_exports(node)
        assert {e["state"] for e in exports} == {"delivered"}
        assert len(exports) == job["outputs"]

        stored = orthanc_instances(orthanc)
        source_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in sources}
        assert source_uids.isdisjoint(stored)  # only the outputs were sent
        assert {e["sop_instance_uid"] for e in exports} == set(stored)
        modalities: dict[str, int] = {}
        for index, (uid, item) in enumerate(stored.items()):
            path = download(orthanc, item["ID"], tmp_path / f"out-{index}.dcm")
            ds = pydicom.dcmread(path)
            assert str(ds.SOPInstanceUID) == uid
            assert ds.StudyInstanceUID == pydicom.dcmread(sources[0]).StudyInstanceUID
            modalities[ds.Modality] = modalities.get(ds.Modality, 0) + 1
            if ds.Modality != "CT" or index < 2:  # every SEG/SR, a couple of derived slices
                assert dciodvfy_errors(path) == [], (ds.Modality, dciodvfy_errors(path))
        assert modalities["SEG"] >= 2  # threshold_segment and kmeans
        assert modalities["SR"] >= 1
        assert modalities["CT"] == len(sources)  # the gaussian-filtered derived series
    finally:
        node.stop()


def test_faulty_plugins_fail_their_jobs_and_the_node_keeps_working(  # raise, hang, exit, OOM
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    plugins = install_test_plugins(tmp_path / "plugins")
    rules = "".join(
        f"""
[[rules]]
name = "{name}"
match = {{ SeriesDescription = "{name}" }}
pipeline = ["{step}"]
destinations = ["pacs"]
"""
        for name, step in [
            ("raises", "fail_raise"),
            ("hangs", "fail_hang"),
            ("exits", "fail_exit"),
            ("hungry", "fail_oom"),
            ("healthy", "gaussian"),
        ]
    )
    config = write_config(
        tmp_path / "node.toml",
        orthanc,
        rules,
        study_quiet_seconds=1.0,
        dask_workers=2,
        receiver_processes=1,
        job_timeout_seconds=10.0,
        dask_memory_limit="700MiB",
    )
    env = plugin_env(plugins)
    node = start_node(tmp_path / "data", config=config, env=env)
    try:
        study = pydicom.uid.generate_uid()
        for name in ("raises", "hangs", "exits", "hungry", "healthy"):
            send_ct(tmp_path, node.port, name, study_instance_uid=study, series_description=name)
        jobs = {job["rule"]: job for job in wait_for_jobs(node, 5, ("succeeded", "failed"), 120)}
        assert jobs["raises"]["state"] == "failed"
        assert "broken on purpose" in jobs["raises"]["error"]
        assert jobs["hangs"]["state"] == "failed"
        assert "timed out after 10 s" in jobs["hangs"]["error"]
        assert jobs["exits"]["state"] == "failed"
        assert "worker process died" in jobs["exits"]["error"]
        assert jobs["hungry"]["state"] == "failed"
        assert "worker process died" in jobs["hungry"]["error"]
        assert jobs["healthy"]["state"] == "succeeded", jobs["healthy"]
        echoscu(node.port, called_ae="DICOMNODE")

        # The restarted workers take new work.
        later = send_ct(tmp_path, node.port, "healthy-later", series_description="healthy")
        assert later
        jobs_after = wait_for_jobs(node, 6, ("succeeded", "failed"), 60)
        assert [j["state"] for j in jobs_after if j["id"] == max(j["id"] for j in jobs_after)] == [
            "succeeded"
        ]
    finally:
        node.stop()


def test_kill_9_mid_job_then_restart_delivers_each_output_once(
    tmp_path: Path, orthanc: OrthancProcess
) -> None:
    plugins = install_test_plugins(tmp_path / "plugins")
    rule = """
[[rules]]
name = "slow"
match = { Modality = "CT" }
pipeline = ["sleepy", "threshold_segment"]
params = { sleepy = { seconds = 6 } }
destinations = ["pacs"]
"""
    config = write_config(
        tmp_path / "node.toml",
        orthanc,
        rule,
        study_quiet_seconds=1.0,
        dask_workers=1,
        receiver_processes=1,
    )
    env = plugin_env(plugins)
    node = start_node(tmp_path / "data", config=config, env=env)
    try:
        sources = send_ct(tmp_path, node.port, "killed")
        wait_for_jobs(node, 1, ("running",), 60)
        node.kill()  # SIGKILL: no clean-up at all
        time.sleep(1.0)
        node = start_node(tmp_path / "data", config=config, env=env, port=node.port)
        [job] = wait_for_jobs(node, 1, ("succeeded", "failed"), 120)
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 2
        exports = wait_for_exports(node)
        assert {e["state"] for e in exports} == {"delivered"}
        outputs = {e["sop_instance_uid"] for e in exports}
        assert len(exports) == len(outputs) == job["outputs"]
        assert len(outputs) > len(sources)  # the copied series plus the SEG (and its SR)
        stored = orthanc_instances(orthanc)
        assert set(stored) == outputs
        statistics = orthanc.get_json("/statistics")
        assert statistics["CountInstances"] == len(outputs)  # type: ignore[index]
    finally:
        node.stop()


def test_jobs_cli_retry_requeues_a_failed_job(tmp_path: Path, orthanc: OrthancProcess) -> None:
    plugins = install_test_plugins(tmp_path / "plugins")
    rule = """
[[rules]]
name = "raises"
match = { Modality = "CT" }
pipeline = ["fail_raise"]
"""
    config = write_config(
        tmp_path / "node.toml", orthanc, rule, study_quiet_seconds=1.0, dask_workers=1
    )
    env = plugin_env(plugins)
    node = start_node(tmp_path / "data", config=config, env=env, timeout=90)
    try:
        send_ct(tmp_path, node.port, "retried")
        [job] = wait_for_jobs(node, 1, ("failed",), 60)
        assert job["attempts"] == 1
        assert cli_json(node, "jobs", "--state", "failed")[0]["id"] == job["id"]
        import subprocess
        import sys

        retried = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "jobs", "retry", str(job["id"])],
            env=node.env,
            capture_output=True,
            text=True,
            cwd=node.data_dir.parent,
        )
        assert retried.returncode == 0, retried.stderr
        time.sleep(0.5)
        [again] = wait_for_jobs(node, 1, ("failed",), 60)
        assert again["attempts"] == 1 and again["finished_at"] != job["finished_at"]
        missing = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "jobs", "retry", "999"],
            env=node.env,
            capture_output=True,
            text=True,
            cwd=node.data_dir.parent,
        )
        assert missing.returncode == 2 and "no job with id 999" in missing.stderr
    finally:
        node.stop()


def test_unet_rule_sends_a_valid_seg_to_orthanc(tmp_path: Path, orthanc: OrthancProcess) -> None:
    """The shipped U-Net through the node: its SEG reaches Orthanc and passes dciodvfy."""
    rule = """
[[rules]]
name = "ct-unet"
match = { Modality = "CT" }
pipeline = ["unet"]
destinations = ["pacs"]
"""
    config = write_config(
        tmp_path / "node.toml", orthanc, rule, study_quiet_seconds=1.0, dask_workers=1
    )
    node = start_node(tmp_path / "data", config=config)
    try:
        series = generate_series(
            num_slices=32, rows=192, columns=192, pixel_spacing=1.8, uid_seed="unet-e2e"
        )
        storescu(series.write(tmp_path / "unet"), node.port, called_ae="DICOMNODE")
        [job] = wait_for_jobs(node, 1, ("succeeded", "failed"), 180)
        assert job["state"] == "succeeded", job
        wait_for_exports(node)
        stored = orthanc_instances(orthanc)
        segs = []
        for index, item in enumerate(stored.values()):
            path = download(orthanc, item["ID"], tmp_path / f"unet-{index}.dcm")
            ds = pydicom.dcmread(path)
            if ds.Modality == "SEG":
                segs.append(ds)
                assert dciodvfy_errors(path) == []
        [seg] = segs
        names = {segment.SegmentLabel for segment in seg.SegmentSequence}
        assert "Lung" in names, names
        assert "unet" in seg.SegmentSequence[0].SegmentAlgorithmName
    finally:
        node.stop()
