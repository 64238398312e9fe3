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


#: Runs a module as ``python -m`` would and reports its own high-water resident set size.
#: Read from /proc/self/status (``VmHWM``), which belongs to the process's memory map since
#: its ``exec``: the ``ru_maxrss`` that ``wait4`` gives carries over what the parent (this
#: script, holding a generated series) had resident when it forked.
MEASURED = """
import runpy, sys
def high_water():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    if module != "-":
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        exec(sys.argv[1])
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
finally:
    print(f"VmHWM {high_water()}", file=sys.stderr)
"""


def peak_rss(module: str, *arguments: str) -> tuple[int, float]:
    """Run ``module`` (``-`` then Python code: that code) in a child; its peak RSS in
    bytes and its wall time."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, module, *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    seconds = time.perf_counter() - started
    reports = [line for line in result.stderr.splitlines() if line.startswith("VmHWM ")]
    if result.returncode != 0 or not reports:
        raise SystemExit(f"{module} {' '.join(arguments[:3])} failed: {result.stderr[-2000:]}")
    return int(reports[-1].split()[1]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--pipeline", default=",".join(CT_DEFAULT_PIPELINE))
    args = parser.parse_args()
    baseline, _ = peak_rss("-", IMPORTS)
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
            output = str(Path(tmp) / "out")
            peak, seconds = peak_rss(
                "dicom_node.cli", "process", str(source), "-o", output, "--pipeline", args.pipeline
            )
        rows.append((slices, peak))
        print(
            f"| {slices} | {volume / MB:.0f} MB | {peak / MB:.0f} MB | {peak / volume:.2f}x"
            f" | {(peak - baseline) / MB:.0f} MB ({(peak - baseline) / volume:.2f}x)"
            f" | {seconds:.0f} s |",
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
