"""Ingest: dicom-node against DCMTK storescp and Orthanc, every target of issue 15, one run.

    .venv/bin/python bench/ingest.py [--rounds 3] [--slices 200] [--concurrency 4]
        [--per-association 20] [--multiframe-mb 400] [--skip-cold-start] ...

Fair to every receiver: DCMTK storescu sends, and every DCMTK-based process (storescu,
storescp, Orthanc, whose DICOM server is DCMTK) runs with TCP_NODELAY=1; every receiver
gets the same files (the same 512x512 CT pixels and sizes) under study, series and
instance UIDs it has never seen, in every round of every measurement; the receivers take
turns within each round, and those not being measured are frozen (SIGSTOP: an idle node
polls, and its timers must not slow the others); dirty pages are flushed (sync) before
every timed transfer; the best of N rounds is reported, with all rounds listed. The node
runs as ``dicom-node serve`` with its defaults (fsync before every acknowledgement, SQLite
index). Orthanc runs with its defaults (SyncStorageArea true: each file fsync'd) and
StorageCompression false.

Measures: one association (node fsync'd and indexed; index lag), N concurrent
associations to the node, a small transfer started beside a large one (pynetdicom issue
#917), one association per instance, the node's memory while it receives a large
multi-frame instance, and the cold start until an association is accepted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ingest_report as measures  # noqa: E402
from bench.ingest_report import Report  # noqa: E402
from bench.ingest_support import (  # noqa: E402
    SeriesTemplate,
    frames_for_megabytes,
    frozen,
    sampled_memory,
    time_to_first_association,
    write_multiframe,
)
from dicom_node.synthetic import generate_series  # noqa: E402
from dicom_node.testing import (  # noqa: E402
    NodeProcess,
    OrthancProcess,
    dcmtk_env,
    free_port,
    node_env,
    orthanc_command,
    require_tool,
    running_node,
    running_orthanc,
    storescp_process,
    storescu,
)

MB = 1e6


@dataclass
class Receiver:
    """A peer under test: where to send, and how many instances it holds."""

    name: str
    port: int
    called_ae: str
    stored_count: Callable[[], int]
    pid: int  # the receiver's process: its tree is frozen while another one is measured
    wait_indexed: bool = False  # the node acknowledges before indexing: wait for the index
    expected: int = 0
    index_lags: list[float] = field(default_factory=list)

    def received(self, count: int, acknowledged: float) -> None:
        """Check that the receiver holds everything sent so far (nobody skips an instance)."""
        self.expected += count
        deadline = acknowledged + 120
        while (held := self.stored_count()) < self.expected:
            if not self.wait_indexed or time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name} holds {held} of {self.expected} instances")
            time.sleep(0.01)
        if self.wait_indexed:
            self.index_lags.append(time.perf_counter() - acknowledged)


def send(receiver: Receiver, files: list[Path], *, one_association_each: bool = False) -> float:
    """Seconds storescu takes to send ``files`` (after a sync, so that earlier writes do
    not land in this transfer); checks the receiver holds them afterwards."""
    os.sync()
    start = time.perf_counter()
    for batch in [[path] for path in files] if one_association_each else [files]:
        result = storescu(batch, receiver.port, called_ae=receiver.called_ae, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"storescu to {receiver.name} failed: {result.stderr[-2000:]}")
    acknowledged = time.perf_counter()
    receiver.received(len(files), acknowledged)
    return acknowledged - start


def start_storescu(files: list[Path], receiver: Receiver) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [require_tool("storescu"), "-aec", receiver.called_ae, "127.0.0.1", str(receiver.port)]
        + [str(path) for path in files],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen[bytes], receiver: Receiver) -> float:
    _, stderr = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"storescu to {receiver.name} failed: {stderr.decode()[-2000:]}")
    return time.perf_counter()


def count_rows(database_url: str) -> Callable[[], int]:
    from sqlalchemy import create_engine, func, select

    from db.models import Instance

    engine = create_engine(database_url)

    def count() -> int:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count(Instance.id))) or 0)

    return count


def node_receiver(node: NodeProcess) -> Receiver:
    count = count_rows(node.database_url)
    return Receiver("node", node.port, node.ae_title, count, node.process.pid, wait_indexed=True)


def orthanc_receiver(orthanc: OrthancProcess) -> Receiver:
    def count() -> int:
        statistics = orthanc.get_json("/statistics")
        assert isinstance(statistics, dict)
        return int(statistics["CountInstances"])

    return Receiver("Orthanc", orthanc.dicom_port, orthanc.ae_title, count, orthanc.process.pid)


@contextmanager
def three_receivers(work: Path) -> Iterator[tuple[Receiver, Receiver, Receiver]]:
    with ExitStack() as stack:
        scp_dir = work / "storescp"
        scp_port, scp = stack.enter_context(storescp_process(scp_dir))
        yield (
            Receiver("storescp", scp_port, "ANY-SCP", lambda: len(os.listdir(scp_dir)), scp.pid),
            orthanc_receiver(stack.enter_context(running_orthanc(work / "orthanc"))),
            node_receiver(stack.enter_context(running_node(work / "node" / "data"))),
        )


def others(peers: tuple[Receiver, ...], measured: Receiver) -> list[int]:
    return [peer.pid for peer in peers if peer is not measured]


class Copies:
    """Fresh copies of the template, each written just before it is sent and removed after."""

    def __init__(self, template: SeriesTemplate, root: Path) -> None:
        self.template, self.root, self.made = template, root, 0

    @contextmanager
    def __call__(self, count: int | None = None) -> Iterator[list[Path]]:
        self.made += 1
        directory = self.root / f"copy{self.made:03d}"
        try:
            yield self.template.write_copy(directory, count)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def rotated(items: tuple[Receiver, ...], by: int) -> list[Receiver]:
    return [items[(index + by) % len(items)] for index in range(len(items))]


def measure_receivers(args: argparse.Namespace, copies: Copies, report: Report) -> None:
    """One association, then one association per instance: storescp, Orthanc, node."""
    with tempfile.TemporaryDirectory(prefix="receivers-", dir=copies.root) as work:
        receivers = three_receivers(Path(work))
        with receivers as peers:
            for round_index in range(args.rounds):
                for receiver in rotated(peers, round_index):
                    with copies() as files, frozen(others(peers, receiver)):
                        rate = len(files) / send(receiver, files)
                    report.add(measures.one_association(receiver.name), rate)
            node = peers[2]
            report.note(
                "node index lag after the last acknowledgement: "
                + ", ".join(f"{lag * 1000:.0f} ms" for lag in node.index_lags)
            )
            if args.per_association:
                for round_index in range(args.rounds):
                    for receiver in rotated(peers, round_index):
                        with (
                            copies(args.per_association) as files,
                            frozen(others(peers, receiver)),
                        ):
                            elapsed = send(receiver, files, one_association_each=True)
                        report.add(measures.per_instance(receiver.name), len(files) / elapsed)
            if args.concurrency > 1 or not args.skip_small_beside_large:
                with frozen(others(peers, node)):
                    measure_node_only(args, copies, node, report)


def measure_node_only(
    args: argparse.Namespace, copies: Copies, node: Receiver, report: Report
) -> None:
    """Each round: one association alone, then ``concurrency`` at once, then a large one
    with a small one started a quarter of the way through (pynetdicom issue #917: the
    large one must not collapse). Both are compared with the same rounds' single one."""
    for _ in range(args.rounds):
        with copies() as files:
            alone = send(node, files)
        report.add(measures.NODE_ALONE, len(files) / alone)
        if args.concurrency > 1:
            with ExitStack() as stack:
                batches = [stack.enter_context(copies()) for _ in range(args.concurrency)]
                os.sync()
                start = time.perf_counter()
                processes = [start_storescu(batch, node) for batch in batches]
                acknowledged = max(finish(process, node) for process in processes)
                total = sum(len(batch) for batch in batches)
                node.received(total, acknowledged)
            report.add(measures.concurrent(args.concurrency), total / (acknowledged - start))
        if not args.skip_small_beside_large:
            measure_small_beside_large(args, copies, node, report, delay=alone / 4)


def measure_small_beside_large(
    args: argparse.Namespace, copies: Copies, node: Receiver, report: Report, delay: float
) -> None:
    with copies() as files, copies(args.small_slices) as small_files:
        os.sync()
        start = time.perf_counter()
        large = start_storescu(files, node)
        time.sleep(delay)
        small_start = time.perf_counter()
        small = start_storescu(small_files, node)
        small_end = finish(small, node)
        large_end = finish(large, node)
        node.received(len(files) + len(small_files), max(small_end, large_end))
    report.add(measures.SMALL_BESIDE_LARGE, len(files) / (large_end - start))
    overlap = "inside" if small_end <= large_end else "NOT inside it (the large one ended first)"
    report.note(
        f"small transfer ({len(small_files)} instances) took {small_end - small_start:.2f} s,"
        f" started {small_start - start:.2f} s into the large one, {overlap}"
    )


def measure_multiframe(args: argparse.Namespace, root: Path, report: Report) -> None:
    """One large multi-frame instance (fresh for each receiver): the receiver's peak
    memory growth, and for the node that the instance arrived whole and was indexed."""
    slices = generate_series(num_slices=16, uid_seed="bench-multiframe").datasets
    source = np.stack([ds.pixel_array.clip(0, 4095).astype(np.uint16) for ds in slices])
    frames = frames_for_megabytes(args.multiframe_mb, source.shape[1], source.shape[2])
    work = root / "multiframe"
    with running_node(work / "node" / "data") as node:
        sent = work / "node.dcm"
        uid = str(write_multiframe(sent, source, frames).SOPInstanceUID)
        receive_large_instance(args, node_receiver(node), sent, report)
        report.note("node: " + stored_instance_check(node, uid, sent))
    if not args.skip_orthanc_multiframe:
        with running_orthanc(work / "orthanc") as orthanc:
            sent = work / "orthanc.dcm"
            write_multiframe(sent, source, frames)
            receive_large_instance(args, orthanc_receiver(orthanc), sent, report)
    shutil.rmtree(work, ignore_errors=True)


def receive_large_instance(
    args: argparse.Namespace, receiver: Receiver, path: Path, report: Report
) -> None:
    with sampled_memory(receiver.pid) as memory:
        elapsed = send(receiver, [path])
    report.add(
        measures.memory_growth(args.multiframe_mb, receiver.name), memory.growth_bytes / MB, "MB"
    )
    report.note(
        f"{receiver.name}: {path.stat().st_size / MB:.0f} MB in {elapsed:.1f} s; peak RSS growth"
        f" {memory.sampled_growth_bytes / MB:.0f} MB sampled ({memory.samples} samples over"
        f" {len(memory.processes)} processes), high-water marks"
        f" {(memory.high_water_growth_bytes or 0) / MB:.0f} MB"
    )


def stored_instance_check(node: NodeProcess, sop_instance_uid: str, sent: Path) -> str:
    """Find the instance in the node's index and compare its file's tail with the sent file."""
    from sqlalchemy import create_engine, select

    from db.models import Instance

    engine = create_engine(node.database_url)
    with engine.connect() as connection:
        row = connection.execute(
            select(Instance.path, Instance.size_bytes).where(
                Instance.sop_instance_uid == sop_instance_uid
            )
        ).one_or_none()
    engine.dispose()
    if row is None:
        return "NOT indexed"
    stored = Path(row.path) if Path(row.path).is_absolute() else node.data_dir / row.path
    if not stored.exists():
        return f"indexed, but {stored} is missing"
    pixels = sent.stat().st_size - 1024  # everything but the headers, which may differ
    same = tail_bytes(stored, pixels) == tail_bytes(sent, pixels)
    return (
        f"indexed, stored {stored.stat().st_size / MB:.1f} MB (index says"
        f" {row.size_bytes / MB:.1f} MB), pixel data {'identical' if same else 'DIFFERENT'}"
    )


def tail_bytes(path: Path, length: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(-length, os.SEEK_END)
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def measure_cold_start(args: argparse.Namespace, root: Path, report: Report) -> None:
    for round_index in range(args.rounds):
        for name in ("node", "Orthanc"):
            work = root / f"cold-{name}-{round_index}"
            work.mkdir()
            port = free_port()
            if name == "node":
                command = [sys.executable, "-m", "dicom_node.cli", "serve"]
                env, called_ae = node_env(work / "data", port), "DICOMNODE"
            else:
                command = orthanc_command(work, "ORTHANC", port, free_port())
                env, called_ae = dcmtk_env(), "ORTHANC"
            seconds = time_to_first_association(
                command, env, port, called_ae=called_ae, cwd=work, log_path=work / "log"
            )
            report.add(measures.cold_start(name), seconds, "s")
            shutil.rmtree(work, ignore_errors=True)


def describe_run(args: argparse.Namespace, template: SeriesTemplate) -> str:
    import dicom_node

    def first_line(command: list[str]) -> str:
        output = subprocess.run(command, capture_output=True, text=True, check=False).stdout
        return next((line for line in output.splitlines() if line.strip()), "?").strip(" $")

    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return "\n".join(
        [
            f"bench/ingest.py, {dt.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores,"
            f" dicom-node {dicom_node.__version__} (commit {commit}),"
            f" {first_line([require_tool('storescu'), '--version'])},"
            f" {first_line([require_tool('Orthanc'), '--version'])}; {load_average()}",
            f"{len(template.files)} slices of 512x512 CT per transfer"
            f" ({template.size_bytes / MB:.0f} MB), fresh UIDs for every receiver in every"
            f" round, best of {args.rounds} rounds; TCP_NODELAY=1 for storescu, storescp"
            " and Orthanc",
            "node: `dicom-node serve` on its defaults (fsync before each acknowledgement,"
            " SQLite index); Orthanc: its defaults (SyncStorageArea true: fsync per file),"
            " StorageCompression false, SQLite index; storescp: no fsync, no index",
        ]
    )


def load_average() -> str:
    """Other work on the machine moves every figure: say how busy it was."""
    one, five, _ = Path("/proc/loadavg").read_text().split(maxsplit=2)
    return f"load average {one} (1 min), {five} (5 min)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds (default 3)")
    parser.add_argument("--slices", type=int, default=200, help="CT slices per transfer")
    parser.add_argument("--concurrency", type=int, default=4, help="associations at once")
    parser.add_argument(
        "--per-association", type=int, default=20, help="instances sent one association each"
    )
    parser.add_argument("--small-slices", type=int, default=5, help="the small transfer")
    parser.add_argument(
        "--multiframe-mb", type=float, default=400, help="multi-frame instance size; 0 skips"
    )
    parser.add_argument("--skip-small-beside-large", action="store_true")
    parser.add_argument("--skip-orthanc-multiframe", action="store_true")
    parser.add_argument("--skip-cold-start", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1 or args.slices < 1 or args.small_slices < 1:
        parser.error("--rounds, --slices and --small-slices must be at least 1")
    if args.per_association > args.slices:
        parser.error("--per-association cannot exceed --slices")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        template = SeriesTemplate.from_datasets(
            generate_series(num_slices=args.slices, uid_seed="bench").datasets
        )
        report = Report(describe_run(args, template))
        print(report.header, flush=True)
        measure_receivers(args, Copies(template, root), report)
        if args.multiframe_mb > 0:
            measure_multiframe(args, root, report)
        if not args.skip_cold_start:
            measure_cold_start(args, root, report)
    print(report.render(args))
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s; {load_average()}")


if __name__ == "__main__":
    main()
