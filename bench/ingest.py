"""Ingest throughput: DCMTK storescu -> DCMTK storescp / Orthanc / dicom-node, in one run.

    .venv/bin/python bench/ingest.py [--slices 200] [--rounds 3] [--concurrency 4]

Every target receives the same 512x512 CT slices (fresh UIDs each round, so nobody
short-cuts duplicates) from DCMTK storescu with TCP_NODELAY=1. The node runs with fsync
and its database on. Prints instances/s (median of the rounds) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select

from db.models import Instance
from dicom_node.synthetic import generate_series
from dicom_node.testing import running_node, running_orthanc, running_storescp, storescu


def write_copies(template: list, count: int, root: Path) -> list[list[Path]]:
    """``count`` copies of the series, each with its own study/series/instance UIDs."""
    copies = []
    for index in range(count):
        study, series = generate_uid(), generate_uid()
        directory = root / f"copy{index:02d}"
        directory.mkdir(parents=True)
        paths = []
        for number, dataset in enumerate(template):
            dataset.StudyInstanceUID = study
            dataset.SeriesInstanceUID = series
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = directory / f"{number:04d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        copies.append(paths)
    return copies


def timed_send(files: list[Path], port: int, called_ae: str) -> float:
    start = time.perf_counter()
    result = storescu(files, port, called_ae=called_ae)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


def timed_one_association_each(files: list[Path], port: int, called_ae: str) -> float:
    """Some modalities open an association per image: this is what that costs."""
    start = time.perf_counter()
    for path in files:
        timed_send([path], port, called_ae)
    return time.perf_counter() - start


def timed_concurrent(batches: list[list[Path]], port: int, called_ae: str) -> float:
    from dicom_node.testing import dcmtk_env, require_tool

    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [require_tool("storescu"), "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for files in batches
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def wait_indexed(database_url: str, expected: int, timeout: float = 120.0) -> float:
    engine = create_engine(database_url)
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < timeout:
            with engine.connect() as connection:
                if connection.scalar(select(func.count(Instance.id))) >= expected:
                    return time.perf_counter() - start
            time.sleep(0.02)
    finally:
        engine.dispose()
    raise TimeoutError(f"fewer than {expected} instances indexed after {timeout} s")


def measure(label: str, rounds: list[list[Path]], send: Callable[[list[Path]], float]) -> float:
    rates = []
    for files in rounds:
        rates.append(len(files) / send(files))
    rate = statistics.median(rates)
    print(f"{label:<34} {rate:8.1f} inst/s   rounds: {', '.join(f'{r:.1f}' for r in rates)}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--per-association", type=int, default=20, help="instances sent one association each"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        template = generate_series(num_slices=args.slices, uid_seed="bench").datasets
        n_copies = 3 * args.rounds + args.concurrency
        copies = write_copies(template, n_copies, root / "input")
        storescp_rounds = copies[: args.rounds]
        orthanc_rounds = copies[args.rounds : 2 * args.rounds]
        node_rounds = copies[2 * args.rounds : 3 * args.rounds]
        concurrent = copies[3 * args.rounds :]
        size_mb = sum(p.stat().st_size for p in copies[0]) / 1e6
        print(
            f"{args.slices} slices of 512x512 CT per round ({size_mb:.0f} MB), {args.rounds} rounds"
        )

        singles = copies[0][: args.per_association]  # new to the node; storescp rewrites
        with running_storescp(root / "storescp") as port:
            scp_rate = measure(
                "DCMTK storescp (no fsync)",
                storescp_rounds,
                lambda files: timed_send(files, port, "STORESCP"),
            )
            scp_single = len(singles) / timed_one_association_each(singles, port, "STORESCP")
        with running_orthanc(root / "orthanc") as orthanc:
            orthanc_rate = measure(
                "Orthanc (SQLite index)",
                orthanc_rounds,
                lambda files: timed_send(files, orthanc.dicom_port, "ORTHANC"),
            )
        with running_node(root / "node" / "data") as node:
            sent = 0

            def send_to_node(files: list[Path]) -> float:
                nonlocal sent
                elapsed = timed_send(files, node.port, "DICOMNODE")
                sent += len(files)
                lag = wait_indexed(node.database_url, sent)
                print(f"{'':<34} indexed {lag * 1000:.0f} ms after the last acknowledgement")
                return elapsed

            node_rate = measure("dicom-node (fsync, database)", node_rounds, send_to_node)
            node_single = len(singles) / timed_one_association_each(singles, node.port, "DICOMNODE")
            sent += len(singles)
            elapsed = timed_concurrent(concurrent, node.port, "DICOMNODE")
            wait_indexed(node.database_url, sent + sum(len(c) for c in concurrent))
            concurrent_rate = sum(len(c) for c in concurrent) / elapsed
            label = f"dicom-node, {args.concurrency} storescu at once"
            print(f"{label:<34} {concurrent_rate:8.1f} inst/s")

        print(
            f"{'one association per instance':<34} storescp {scp_single:.1f} inst/s, "
            f"dicom-node {node_single:.1f} inst/s"
        )
        print()
        print(f"node / storescp            {node_rate / scp_rate:5.2f}x   (target >= 0.5)")
        print(f"node / Orthanc             {node_rate / orthanc_rate:5.2f}x   (target >= 2)")
        scaling = concurrent_rate / node_rate
        print(f"node {args.concurrency} senders / 1 sender   {scaling:5.2f}x   (target >= 1.7)")


if __name__ == "__main__":
    main()
