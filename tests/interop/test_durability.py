"""What storescu saw acknowledged survives kill -9; SIGTERM finishes in-flight stores."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_support import RECEIVE_ONLY
from pydicom import dcmread
from sqlalchemy import create_engine, select

from db.models import Instance
from dicom_node.synthetic import SyntheticSeries, generate_series
from dicom_node.testing import NodeProcess, dcmtk_env, echoscu, require_tool, start_node

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module")
def long_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSeries, list[Path]]:
    series = generate_series(num_slices=60, uid_seed="durability")
    return series, series.write(tmp_path_factory.mktemp("long"))


def storescu_watching(port: int, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "stdbuf",
            "-oL",
            "-eL",
            require_tool("storescu"),
            "-v",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def acknowledged(lines: Iterator[str], stop_after: int | None, on_reached) -> list[Path]:  # type: ignore[no-untyped-def]
    """Files storescu saw a Success response for, in order, as its log says."""
    current: Path | None = None
    acked: list[Path] = []
    for line in lines:
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            if stop_after is not None and len(acked) == stop_after:
                on_reached()
    return acked


def indexed_sop_uids(node: NodeProcess) -> set[str]:
    engine = create_engine(node.database_url)
    with engine.connect() as connection:
        uids = set(connection.scalars(select(Instance.sop_instance_uid)))
    engine.dispose()
    return uids


def test_kill_9_while_receiving_loses_nothing_acknowledged(
    tmp_path: Path, long_series: tuple[SyntheticSeries, list[Path]]
) -> None:
    _, files = long_series
    data_dir = tmp_path / "data"
    node = start_node(data_dir, env={**RECEIVE_ONLY, "DICOM_NODE_RECEIVER_PROCESSES": "2"})
    sender = storescu_watching(node.port, files)
    assert sender.stdout is not None
    acked = acknowledged(iter(sender.stdout.readline, ""), 15, node.kill)
    sender.wait(60)
    assert sender.returncode != 0, "the sender must have seen the node die"
    assert 15 <= len(acked) < len(files)

    restarted = start_node(
        data_dir, port=node.port, env=RECEIVE_ONLY
    )  # binds: no orphaned receiver holds the port
    try:
        uids = indexed_sop_uids(restarted)
        for path in acked:
            sent = dcmread(path)
            spooled = (
                data_dir
                / "spool"
                / sent.StudyInstanceUID
                / sent.SeriesInstanceUID
                / f"{sent.SOPInstanceUID}.dcm"
            )
            assert dcmread(spooled) == sent
            assert sent.SOPInstanceUID in uids
        assert not list((data_dir / "spool").rglob(".incoming-*"))
    finally:
        restarted.stop()


def test_sigterm_finishes_the_open_association_then_exits(
    tmp_path: Path, long_series: tuple[SyntheticSeries, list[Path]]
) -> None:
    _, files = long_series
    node = start_node(tmp_path / "data", env={**RECEIVE_ONLY, "DICOM_NODE_RECEIVER_PROCESSES": "2"})
    sender = storescu_watching(node.port, files)
    assert sender.stdout is not None
    acked = acknowledged(
        iter(sender.stdout.readline, ""), 5, lambda: node.process.send_signal(signal.SIGTERM)
    )
    assert sender.wait(60) == 0
    assert len(acked) == len(files)
    assert node.process.wait(60) == 0
    assert echoscu(node.port).returncode != 0  # no longer accepting
    assert indexed_sop_uids(node) == {dcmread(p).SOPInstanceUID for p in files}
