"""The worker side of a job: what a Dask worker process imports and runs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom

from dicom_node.synthetic import generate_series

DATABASE_PACKAGES = ("db", "sqlalchemy", "alembic", "psycopg")

RUN_A_JOB = """
import json, sys
from dicom_node.jobs.worker import JobSpec, run_job

paths = tuple(json.loads(sys.argv[1]))
spec = JobSpec(1, "series", paths, ("gaussian", "threshold_segment"), {}, sys.argv[2])
result = run_job(spec)
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[3])))
print(json.dumps({"outputs": sorted({r.kind for r in result.records}), "loaded": loaded}))
"""


def test_a_worker_runs_a_job_without_importing_the_database(tmp_path: Path) -> None:
    files = generate_series(num_slices=4, rows=32, columns=32, uid_seed="worker-no-db").write(
        tmp_path / "series"
    )
    arguments = [json.dumps([str(p) for p in files]), str(tmp_path / "out")]
    completed = subprocess.run(
        [sys.executable, "-c", RUN_A_JOB, *arguments, json.dumps(DATABASE_PACKAGES)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["outputs"] == ["derived", "seg", "sr"]  # load, run and every encoder
    assert report["loaded"] == []


RUN_A_JOB_REPORTING = """
import json, sys
from dicom_node.jobs.worker import JobSpec, run_job

paths = tuple(json.loads(sys.argv[1]))
result = run_job(JobSpec(1, "series", paths, ("threshold_segment",), {}, sys.argv[2]))
kinds = sorted({r.kind for r in result.records})
print(json.dumps({"outputs": kinds, "problems": result.problems}))
"""


def test_a_malformed_birth_date_neither_stops_the_job_nor_reaches_its_logs(tmp_path: Path) -> None:
    """A fresh worker process (nobody configured its logging): pydicom's warnings about the
    value stay quiet, and the SEG and SR are made with the date left empty."""
    birth_date = "1961-04-09"  # not a DICOM DA: YYYYMMDD
    series = generate_series(num_slices=4, rows=32, columns=32, uid_seed="malformed-date")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the value as it is set
        for dataset in series.datasets:
            dataset.PatientBirthDate = birth_date
        files = series.write(tmp_path / "series")
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_A_JOB_REPORTING,
            json.dumps([str(p) for p in files]),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["outputs"] == ["seg", "sr"]
    assert report["problems"] == ["left empty in the outputs, not a valid value: PatientBirthDate"]
    assert birth_date not in completed.stderr + completed.stdout
    for output in (tmp_path / "out").rglob("*.dcm"):
        assert pydicom.dcmread(output).PatientBirthDate == ""
