"""Where a C-STORE's CPU time goes: one receiver in-process under yappi, DCMTK storescu sending.

    .venv/bin/python -P bench/profile_ingest.py [--slices 200] [--clock cpu|wall]

Prints the CPU seconds spent under the main stages (inclusive, so they overlap) and
the top functions. Profiling slows everything about 3x; read the shares, not the times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yappi

from dicom_node.logging import configure_logging
from dicom_node.node import Node
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings, storescu

STAGES = {
    "association thread (read, decode, answer)": "Association._serve_established",
    "  PDU reads (socket)": "PduReader.read",
    "  C-STORE: dataset fragments to the spool file": "IncomingInstance.write",
    "  C-STORE: check, file, index queue": "IncomingInstance.finish",
    "    header read (index fields)": "IncomingInstance._fields",
    "    fsync + rename + directory fsync": "IncomingFile.commit",
    "  response encode and send": "Association._respond",
    "dicom-node indexer (batched SQL)": "Indexer._commit",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="wall: where the time goes, waits included",
    )
    args = parser.parse_args()
    configure_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        files = generate_series(num_slices=args.slices, uid_seed="profile").write(Path(tmp) / "in")
        node = Node(local_settings(Path(tmp), receiver_processes=1, index_flush_seconds=0.25))
        node.start()
        yappi.set_clock_type(args.clock)
        yappi.start()
        start = time.perf_counter()
        result = storescu(files, node.settings.port, called_ae="DICOMNODE")
        wall = time.perf_counter() - start
        assert node.indexer is not None
        node.indexer.flush()
        yappi.stop()
        node.stop(1)
        assert result.returncode == 0, result.stderr
    stats = yappi.get_func_stats()
    total = sum(thread.ttot for thread in yappi.get_thread_stats())
    print(f"{args.slices} instances, {wall:.2f} s wall under the profiler, {total:.2f} s CPU")
    for label, name in STAGES.items():
        seconds = sum(f.ttot for f in stats if f.name == name)
        print(f"{label:<46} {seconds:6.2f} s  {100 * seconds / total:5.1f} %")
    print("\ntop functions by own time:")
    stats.sort("tsub")
    for entry in list(stats)[:15]:
        module = entry.module.split("site-packages/")[-1]
        print(f"{entry.tsub:6.2f} s  {entry.ncall:7d} calls  {module}:{entry.lineno} {entry.name}")


if __name__ == "__main__":
    main()
