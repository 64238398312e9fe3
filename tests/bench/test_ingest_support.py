"""bench/ingest_support.py: fresh copies, the multi-frame instance, memory of a process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bench.ingest_support import (
    SeriesTemplate,
    fixed_length_uid,
    frames_for_megabytes,
    frozen,
    process_tree,
    sampled_memory,
    time_to_first_association,
    write_multiframe,
)
from dicom_node.synthetic import generate_series
from dicom_node.testing import dcmtk_env, free_port, require_tool


@pytest.fixture
def template() -> SeriesTemplate:
    series = generate_series(num_slices=3, rows=32, columns=32, uid_seed="bench-copies")
    return SeriesTemplate.from_datasets(series.datasets)


def test_fixed_length_uids_are_valid_new_and_all_the_same_length() -> None:
    uids = {fixed_length_uid() for _ in range(1000)}
    assert len(uids) == 1000
    assert {len(uid) for uid in uids} == {44}
    assert all(pydicom.uid.UID(uid).is_valid for uid in uids)


def test_copies_have_the_templates_bytes_under_uids_nobody_has_seen(
    template: SeriesTemplate, tmp_path: Path
) -> None:
    first, second = template.write_copy(tmp_path / "a"), template.write_copy(tmp_path / "b")
    seen: set[str] = {template.files[0].study_uid, template.files[0].series_uid}
    seen |= {file.instance_uid for file in template.files}
    for paths in (first, second):
        datasets = [pydicom.dcmread(path) for path in paths]
        assert len({ds.StudyInstanceUID for ds in datasets}) == 1
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        uids = {datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID}
        uids |= {ds.SOPInstanceUID for ds in datasets}
        assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in datasets)
        assert len(uids) == 2 + len(paths)
        assert not uids & seen
        seen |= uids
        for path, file in zip(paths, template.files, strict=True):
            data = path.read_bytes()
            assert len(data) == len(file.data)
            assert data[file.header_length :] == file.data[file.header_length :]


def test_a_copy_can_take_the_first_files_only(template: SeriesTemplate, tmp_path: Path) -> None:
    assert [path.name for path in template.write_copy(tmp_path / "c", 2)] == [
        "0000.dcm",
        "0001.dcm",
    ]


def test_the_multiframe_instance_cycles_its_source_frames(tmp_path: Path) -> None:
    source = (np.arange(3 * 16 * 8).reshape(3, 16, 8) % 4096).astype(np.uint16)
    dataset = write_multiframe(tmp_path / "mf.dcm", source, 7)
    read = pydicom.dcmread(tmp_path / "mf.dcm")
    assert read.SOPInstanceUID == dataset.SOPInstanceUID
    assert read.NumberOfFrames == 7
    assert np.array_equal(read.pixel_array, source[[0, 1, 2, 0, 1, 2, 0]])
    assert frames_for_megabytes(400, 512, 512) == 763  # 400 MB of 512x512 16-bit frames


@pytest.mark.interop
def test_the_multiframe_instance_is_valid_for_dciodvfy(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "mf.dcm", np.zeros((2, 16, 16), np.uint16), 3)
    result = subprocess.run(
        [require_tool("dciodvfy"), str(tmp_path / "mf.dcm")], capture_output=True, text=True
    )
    assert "Error" not in result.stderr, result.stderr


GRANDCHILD = """
import pathlib, sys, time
trigger = pathlib.Path(sys.argv[1])
while not trigger.exists():
    time.sleep(0.005)
block = b"x" * 80_000_000
pathlib.Path(sys.argv[2]).touch()
time.sleep(0.3)
"""


def test_sampled_memory_counts_a_grandchilds_growth(tmp_path: Path) -> None:
    trigger, done = tmp_path / "go", tmp_path / "done"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run(sys.argv[1:])",
            sys.executable,
            "-c",
            GRANDCHILD,
            str(trigger),
            str(done),
        ]
    )
    try:
        while len(process_tree(parent.pid)) < 2:
            time.sleep(0.01)
        with sampled_memory(parent.pid) as memory:
            trigger.touch()
            while not done.exists():
                time.sleep(0.01)
        assert memory.sampled_growth_bytes > 70e6
        assert memory.high_water_growth_bytes is not None
        assert memory.high_water_growth_bytes > 70e6
        assert len(memory.processes) == 2
    finally:
        parent.wait(30)


@pytest.mark.interop
def test_time_to_first_association_of_storescp(tmp_path: Path) -> None:
    port = free_port()
    seconds = time_to_first_association(
        [require_tool("storescp"), "-od", str(tmp_path), str(port)],
        dcmtk_env(),
        port,
        called_ae="STORESCP",
        cwd=tmp_path,
        log_path=tmp_path / "log",
    )
    assert 0 < seconds < 30


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_frozen_processes_use_no_cpu_until_the_block_ends() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with frozen([busy.pid]):
            before = cpu_seconds(busy.pid)
            time.sleep(0.3)
            assert cpu_seconds(busy.pid) - before < 0.02
        time.sleep(0.3)
        assert cpu_seconds(busy.pid) - before > 0.05
    finally:
        busy.kill()
        busy.wait()
