"""The low-disk watermark on receiving: 0xA700 before the disk is full, back by itself.

The state machine is tested with a free-space probe and a clock of the test's own. The
node is tested on a real file system whose free space the test controls: a small tmpfs
(mounted as root, as CI runs and as ``test_c_store_disk_full`` does), filled with a file
and emptied again, with DCMTK's ``storescu`` as the sender and the node not restarted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dicom_node.api.testing import api_harness, settings_for
from dicom_node.disk_space import ReceiveWatermark, free_bytes
from dicom_node.node import Node
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings, storescu
from tests.dicom_node.small_fs import mounted_tmpfs

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Disk:
    """Free bytes the test sets; counts how often it is asked."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.asked = 0

    def __call__(self) -> int:
        self.asked += 1
        return self.free


def test_pauses_below_the_minimum_and_resumes_above_it_plus_the_margin() -> None:
    disk, clock = Disk(100 * MiB), Clock()
    watermark = ReceiveWatermark(50 * MiB, 10 * MiB, disk, probe_interval=1.0, clock=clock)
    with capture_logs() as logs:
        assert not watermark.paused()
        for free, paused in [(49, True), (55, True), (59, True), (60, False), (51, False)]:
            disk.free = free * MiB
            clock.now += 1.0
            assert watermark.paused() is paused, free
        disk.free = 10 * MiB
        clock.now += 1.0
        for _ in range(100):  # many instances refused: one line
            assert watermark.paused()
    events = [entry["event"] for entry in logs]
    assert events == [
        "receiving paused: the spool's disk is nearly full",
        "receiving resumed: disk space is back",
        "receiving paused: the spool's disk is nearly full",
    ]


def test_free_space_is_asked_at_most_once_a_probe_interval() -> None:
    disk, clock = Disk(10 * MiB), Clock()
    watermark = ReceiveWatermark(50 * MiB, 0, disk, probe_interval=1.0, clock=clock)
    for _ in range(1000):
        assert watermark.paused()
        clock.now += 0.0021
    assert disk.asked == 3  # at 0, after 1 s and after 2 s
    disk.free = 100 * MiB
    assert watermark.paused()  # not asked again yet
    clock.now += 1.0
    assert not watermark.paused()


def test_a_minimum_of_zero_never_pauses_nor_asks() -> None:
    disk = Disk(0)
    watermark = ReceiveWatermark(0, 0, disk)
    assert not watermark.paused()
    assert disk.asked == 0


def test_a_probe_that_fails_keeps_the_last_state() -> None:
    clock = Clock()
    answers: list[int | OSError] = [10 * MiB, OSError(5, "I/O error")]

    def probe() -> int:
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    watermark = ReceiveWatermark(50 * MiB, 0, probe, clock=clock)
    assert watermark.paused()
    clock.now += 5
    assert watermark.paused()


def test_readyz_says_when_the_spool_disk_is_below_the_watermark(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    with api_harness(settings_for(tmp_path, receive_min_free_bytes=free * 2)) as api:
        not_ready = api.client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["disk_space"] is False


# -- a node on a file system that fills up and empties ---------------------------------------

TMPFS_BYTES = 48 * MiB
MIN_FREE = 16 * MiB
MARGIN = 8 * MiB
SLICES = 4


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "small-fs", TMPFS_BYTES) as mount_point:
        yield mount_point


def _log_events(log: str, event: str) -> int:
    count = 0
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        count += isinstance(entry, dict) and entry.get("event") == event
    return count


def test_storescu_gets_out_of_resources_while_the_disk_is_low_then_stores(
    tmp_path: Path, small_file_system: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    series = generate_series(num_slices=SLICES, rows=64, columns=64, uid_seed="low-disk")
    files = series.write(tmp_path / "slices")
    uids = {dataset.SOPInstanceUID for dataset in series.datasets}
    settings = local_settings(
        tmp_path,
        data_dir=small_file_system / "data",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        receiver_processes=2,  # processes of their own, each with its watermark
        log_format="json",
        receive_min_free_bytes=MIN_FREE,
        receive_free_margin_bytes=MARGIN,
    )
    node = Node(settings)
    node.start()
    try:
        # Leave less than the minimum free, but room enough for every slice.
        filler = small_file_system / "filler"
        filler.write_bytes(b"\0" * (free_bytes(small_file_system) - MIN_FREE + 4 * MiB))
        assert free_bytes(small_file_system) < MIN_FREE - 2 * MiB
        refused = storescu(files, settings.port, extra_args=["--debug", "--no-halt"])
        answers = refused.stdout + refused.stderr
        assert answers.count("DIMSE Status                  : 0xa700") == SLICES, answers
        assert answers.count("[Disk space low: receiving paused]") == SLICES
        spooled = {path.stem for path in settings.spool_dir.glob("*/*/*.dcm")}
        assert not spooled & uids, "an instance refused for lack of space was kept"

        filler.unlink()  # the operator frees space: the same node stores again
        deadline = time.monotonic() + 30
        while True:
            stored = storescu(files, settings.port, extra_args=["--debug", "--no-halt"])
            spooled = {path.stem for path in settings.spool_dir.glob("*/*/*.dcm")}
            if stored.returncode == 0 and uids <= spooled:
                break
            assert time.monotonic() < deadline, stored.stderr
            time.sleep(0.5)
        assert (stored.stdout + stored.stderr).count(": 0x0000: Success") == SLICES
    finally:
        node.stop(grace_seconds=5)
    log = capfd.readouterr().err
    # Each receiver process that saw the disk low says so once, not once per instance.
    paused = _log_events(log, "receiving paused: the spool's disk is nearly full")
    resumed = _log_events(log, "receiving resumed: disk space is back")
    assert 1 <= paused <= 2 and resumed <= paused, log[-3000:]
