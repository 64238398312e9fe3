"""Peak memory of processing a study, against the size of its float32 volume, in one run.

    .venv/bin/python bench/memory.py [--slices 200 1000] [--pipeline gaussian,...]

For each size, a 512x512 CT series of that many slices is generated and written once;
``dicom-node process`` (what a job runs on a worker) takes it through the pipeline (the
default CT pipeline unless told) in a child process, whose peak resident set size is read
from the kernel when it exits (``wait4``). The figure is that peak divided by the bytes of
the series as a float32 volume (slices x rows x columns x 4), the issue's target being at
most 4x; printed beside it: the same child's peak with nothing to process (the interpreter
and the libraries: a fixed cost that weighs on small studies only), the growth above it,
and how the peak grows per slice between the sizes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.synthetic import generate_series  # noqa: E402
from dicom_node.testing import CT_DEFAULT_PIPELINE  # noqa: E402

MB = 2**20
IMPORTS = (
    "import dicom_node.process, dicom_node.cli, processors.denoise, processors.segment,"
    " processors.cluster, processors.features, sklearn.cluster, highdicom"
)


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Run ``command``; its peak RSS in bytes (``ru_maxrss``) and its wall time."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        error = child.stderr.read().decode(errors="replace") if child.stderr else ""
        raise SystemExit(f"{' '.join(command[:5])} ... failed ({child.returncode}): {error}")
    return usage.ru_maxrss * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--pipeline", default=",".join(CT_DEFAULT_PIPELINE))
    args = parser.parse_args()
    python = sys.executable
    baseline, _ = peak_rss([python, "-c", IMPORTS])
    print(f"bench/memory.py: pipeline {args.pipeline}; {os.cpu_count()} cores")
    print(f"interpreter and libraries alone: {baseline / MB:.0f} MB peak RSS")
    print("| slices | float32 volume | peak RSS | peak / volume | growth above libraries | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for slices in args.slices:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            source = Path(tmp) / "in"
            series = generate_series(num_slices=slices, uid_seed=f"bench-memory-{slices}")
            series.write(source)
            del series
            volume = slices * 512 * 512 * 4
            peak, seconds = peak_rss(
                [python, "-m", "dicom_node.cli", "process", str(source), "-o", str(Path(tmp) / "out")]
                + ["--pipeline", args.pipeline]
            )
        rows.append((slices, peak))
        print(
            f"| {slices} | {volume / MB:.0f} MB | {peak / MB:.0f} MB | {peak / volume:.2f}x"
            f" | {(peak - baseline) / MB:.0f} MB ({(peak - baseline) / volume:.2f}x) | {seconds:.0f} s |",
            flush=True,
        )
    if len(rows) > 1:
        (small, small_peak), (large, large_peak) = rows[0], rows[-1]
        per_slice = (large_peak - small_peak) / (large - small)
        print(
            f"growth from {small} to {large} slices: {per_slice / MB:.2f} MB per slice"
            f" ({per_slice / (512 * 512 * 4):.2f}x a float32 slice)"
        )


if __name__ == "__main__":
    main()
