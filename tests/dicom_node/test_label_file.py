"""A slide's label map on disk (dicom_node.label_file): an array to its readers, an
unnamed file in the run's folder, and no more of it in the process than it works on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_node.label_file import disk_label_map, release


def resident_file_mb() -> float:
    """This process's resident pages of mapped files (``RssFile``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_label_map_written_a_region_at_a_time_reads_back_whole(tmp_path: Path) -> None:
    labels = disk_label_map((1, 300, 500), np.uint16, tmp_path)
    expected = np.zeros((1, 300, 500), dtype=np.uint16)
    rng = np.random.default_rng(0)
    for top in range(0, 300, 128):
        for left in range(0, 500, 128):
            block = rng.integers(0, 300, (min(128, 300 - top), min(128, 500 - left)))
            labels[0, top : top + 128, left : left + 128] = block
            expected[0, top : top + 128, left : left + 128] = block
            release(labels)
    assert labels.dtype == np.uint16 and labels.shape == (1, 300, 500)
    np.testing.assert_array_equal(labels, expected)
    assert list(tmp_path.iterdir()) == []  # the file has no name: gone with the map


def test_released_pages_leave_the_process(tmp_path: Path) -> None:
    before = resident_file_mb()
    labels = disk_label_map((1, 8192, 8192), np.uint8, tmp_path)  # 64 MB
    for top in range(0, 8192, 1024):
        labels[0, top : top + 1024] = 1
        release(labels[0, top : top + 1024])  # a view finds the mapping too
    assert resident_file_mb() - before < 16
    assert int(labels[0, ::1024, ::1024].sum()) == 64  # what was written is kept
    written = np.asarray(labels[0, :1024]).sum(dtype=np.int64)
    assert written == 1024 * 8192


def test_an_array_in_memory_is_left_as_it_is() -> None:
    labels = np.ones((1, 4, 4), dtype=np.uint8)
    release(labels)
    assert int(labels.sum()) == 16
