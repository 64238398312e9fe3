"""End to end: last instance acknowledged -> every output stored in Orthanc.

    .venv/bin/python bench/e2e.py [--slices 200] [--quiet 2] [--workers 1]

A generated 512x512 CT goes from DCMTK storescu (TCP_NODELAY=1) to the node (subprocess,
Dask executor, fsync on), whose rule ``ct-default`` runs gaussian, threshold_segment,
kmeans and features and sends every output to a private Orthanc. The figure is the time
from the last instance's acknowledgement to the last output stored in Orthanc, minus the
quiet time. The per-step breakdown comes from the node's database (jobs.step_timings,
exports.delivered_at).

Reference, measured in the same run on the same machine: ``dicom-node process`` on the
same files (the pipeline alone, in one process) plus DCMTK storescu of its outputs to the
same Orthanc. The ratio shows what the node's orchestration adds to that floor.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, select  # noqa: E402

from db.models import (  # noqa: E402
    Export,
    Instance,
    Job,
    as_utc,
)
from dicom_node.synthetic import generate_series  # noqa: E402
from dicom_node.testing import (  # noqa: E402
    CT_DEFAULT_PIPELINE,
    ct_default_config,
    running_orthanc,
    start_node,
    storescu,
)

PIPELINE = list(CT_DEFAULT_PIPELINE)


def orthanc_count(orthanc: object) -> int:
    return int(orthanc.get_json("/statistics")["CountInstances"])  # type: ignore[attr-defined]


def wait_until_stored(orthanc: object, expected: int, timeout: float = 900.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc_count(orthanc) >= expected:
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"Orthanc has {orthanc_count(orthanc)} of {expected} instances")


def node_run(work: Path, files: list[Path], quiet: float, workers: int) -> dict[str, float]:
    with running_orthanc(work / "orthanc-node") as orthanc:
        config = work / "node.toml"
        config.write_text(
            ct_default_config(
                orthanc, work / "data", study_quiet_seconds=quiet, dask_workers=workers
            )
        )
        node = start_node(work / "data", config=config)
        try:
            result = storescu(files, node.port, called_ae="DICOMNODE")
            acknowledged = time.monotonic()
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            engine = create_engine(node.database_url)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                with engine.connect() as db:
                    jobs = db.execute(select(Job.state, Job.num_outputs)).all()
                    delivered = db.scalar(
                        select(func.count(Export.id)).where(Export.state == "delivered")
                    )
                if jobs and jobs[0][0] == "failed":
                    raise RuntimeError(f"the job failed:\n{node.log()[-3000:]}")
                if jobs and jobs[0][0] == "succeeded" and delivered == jobs[0][1]:
                    break
                time.sleep(0.05)
            stored = wait_until_stored(orthanc, jobs[0][1])
            with engine.connect() as db:
                job = db.execute(select(Job)).one()
                last_received = as_utc(db.scalar(select(func.max(Instance.received_at))))
                last_delivered = as_utc(db.scalar(select(func.max(Export.delivered_at))))
            engine.dispose()
        finally:
            node.stop()
    due = last_received.timestamp() + quiet
    steps = {s["step"]: s["seconds"] for s in job.step_timings or []}
    breakdown = {
        "total (ack -> in Orthanc, minus quiet)": stored - acknowledged - quiet,
        "wait for completion + dispatch": as_utc(job.started_at).timestamp() - due,
        **{f"job {name}": seconds for name, seconds in steps.items()},
        # Encodes run on a second thread while the next step runs: the job's critical
        # path is the load, the runs and the final wait for encodes.
        "job bookkeeping (worker -> recorded)": (
            as_utc(job.finished_at) - as_utc(job.started_at)
        ).total_seconds()
        - sum(v for k, v in steps.items() if not k.endswith(":encode")),
        "export to Orthanc": last_delivered.timestamp() - as_utc(job.finished_at).timestamp(),
        "outputs": float(job.num_outputs),
    }
    return breakdown


def reference_run(work: Path, source: Path) -> dict[str, float]:
    """dicom-node process, then storescu of everything it wrote, to a fresh Orthanc."""
    out = work / "reference-out"
    start = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "process",
            "-p",
            ",".join(PIPELINE),
            str(source),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    processed = time.monotonic()
    outputs = sorted(p for p in out.rglob("*.dcm"))
    with running_orthanc(work / "orthanc-reference") as orthanc:
        sent_start = time.monotonic()
        result = storescu(outputs, orthanc.dicom_port, called_ae="ORTHANC", extra_args=["-R"])
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        sent = time.monotonic()
    return {
        "process": processed - start,
        "storescu to Orthanc": sent - sent_start,
        "total": processed - start + sent - sent_start,
        "outputs": float(len(outputs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as temp:
        work = Path(temp)
        series = generate_series(num_slices=args.slices, rows=512, columns=512, uid_seed="e2e")
        files = series.write(work / "study")
        print(f"{args.slices} slices of 512x512 CT, rule ct-default: {' > '.join(PIPELINE)}")
        node = node_run(work, files, args.quiet, args.workers)
        reference = reference_run(work, work / "study")
    width = max(map(len, node))
    print("\nnode, from the database:")
    for name, value in node.items():
        print(f"  {name:<{width}} {value:8.2f}")
    print("\nreference (dicom-node process + storescu to Orthanc):")
    for name, value in reference.items():
        print(f"  {name:<{width}} {value:8.2f}")
    total = node["total (ack -> in Orthanc, minus quiet)"]
    print(f"\nnode end to end: {total:.2f} s (target <= 15 s on 2 cores)")
    print(f"node / reference: {total / reference['total']:.2f}x")


if __name__ == "__main__":
    main()
