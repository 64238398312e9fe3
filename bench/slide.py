"""Peak memory of a whole-slide pipeline against the slide's size.

    .venv/bin/python bench/slide.py [--sizes 4096 16384] [--pipelines P ...] [--dir DIR] [--keep]

For each size a generated RGB slide (``dicom_node.testing_slide``: discs on glass, 256x256
tiles, uncompressed, TILED_FULL) is written to DIR (a temporary folder unless given), and
each pipeline runs in a fresh process (``dicom_node.slide_process.process_slide``), which
reports its peak resident set (``VmHWM``), its peak after the imports, its time and what
it wrote:

- ``gaussian,features``: a filter (written as a derived slide, a band of tiles at a time)
  and slide-wide statistics to an SR; nothing slide-sized is held (the tile cache, a
  region and its halo);
- ``gaussian,threshold_segment``: the same plus a segmentation, its label map on disk
  (``dicom_node.label_file``) and its SEG written a tile at a time
  (``encode.seg.streamed_slide_seg``).

The discs' areas in the SR are checked against the truth (their exact pixel counts).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PIPELINES = {
    "gaussian,features": {
        "gaussian": {"sigma_mm": 0.001},
        "features": {"region_threshold": None, "sift": False, "haar": False},
    },
    "gaussian,threshold_segment": {
        "gaussian": {"sigma_mm": 0.001},
        "threshold_segment": {
            "preset": "body",
            "separate_components": True,
            "min_size_voxels": 100,
        },
    },
}
TILE = 256
PITCH = 1024  # one disc per 1024x1024 pixels
RADIUS = 300.0


def rss_mb() -> float:
    """This process's own high-water mark (``VmHWM``; ``ru_maxrss`` would carry over what
    the forking parent had resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(path: Path, pipeline: str, out: Path) -> None:
    """Run one pipeline on one slide and print what it measured (a JSON line)."""
    from dicom_node.process import build_steps
    from dicom_node.slide_process import process_slide

    steps = build_steps(pipeline.split(","), params=PIPELINES[pipeline])
    imported = rss_mb()
    started = time.perf_counter()
    problems: list[str] = []
    records = process_slide([path], steps, out, problems=problems)
    seconds = time.perf_counter() - started
    areas: list[float] = []
    for record in records:
        if record.kind == "sr" and "threshold" in record.processor_name:
            import pydicom

            report = pydicom.dcmread(record.path)
            stack = list(report.ContentSequence)
            while stack:
                item = stack.pop()
                stack += list(item.get("ContentSequence", []))
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                if item.get("ValueType") == "NUM" and name == "Area":
                    areas.append(float(item.MeasuredValueSequence[0].NumericValue))
    print(
        json.dumps(
            {
                "peak_mb": rss_mb(),
                "after_imports_mb": imported,
                "seconds": seconds,
                "outputs": sorted(r.kind for r in records),
                "areas": areas,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--pipelines", nargs="+", choices=list(PIPELINES), default=list(PIPELINES))
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated slides")
    parser.add_argument("--child", nargs=3, metavar=("SLIDE", "PIPELINE", "OUT"))
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        return

    from dicom_node.testing_slide import grid_of_discs, write_disc_slide

    folder = args.dir or Path(tempfile.mkdtemp(prefix="slide-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{'size':>11} {'pipeline':<28} {'peak MB':>8} {'imports MB':>10} {'s':>7}  outputs")
    for size in args.sizes:
        path = folder / f"slide-{size}.dcm"
        discs = grid_of_discs(size, size, PITCH, RADIUS)
        if not path.exists():
            write_disc_slide(path, rows=size, columns=size, discs=discs, tile=TILE)
        truth = sorted(d.pixels * 0.0005**2 for d in discs)
        for pipeline in args.pipelines:
            with tempfile.TemporaryDirectory(dir=folder) as out:
                command = [sys.executable, __file__, "--child", str(path), pipeline, out]
                line = subprocess.run(command, check=True, capture_output=True, text=True)
            found = json.loads(line.stdout.strip().splitlines()[-1])
            outputs = ",".join(found["outputs"])
            print(
                f"{size:>5}x{size:<5} {pipeline:<28} {found['peak_mb']:8.0f} "
                f"{found['after_imports_mb']:10.0f} {found['seconds']:7.1f}  {outputs}",
                flush=True,
            )
            if found["areas"]:
                errors = [
                    abs(a - t) / t for a, t in zip(sorted(found["areas"]), truth, strict=False)
                ]
                print(
                    f"{'':>11} {len(found['areas'])} discs found of {len(truth)}; largest area "
                    f"error {100 * max(errors):.2f}%",
                    flush=True,
                )
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
