"""The worker side of a job: what a Dask worker process imports and runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest

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


def test_a_job_reads_its_keys_from_the_key_file_and_never_carries_them(tmp_path: Path) -> None:
    """The spec names the key file (a worker loads it); the keys are in no field, repr or
    pickle of the spec. Encrypted sources are read and the outputs written encrypted; a
    key file the worker cannot read fails the job with the reason."""
    import pickle

    from dicom_node.jobs.worker import JobError, JobSpec, run_job
    from dicom_node.security.crypto import MAGIC, read_dicom, save_dataset
    from dicom_node.security.keys import KeyRing, write_key_file

    keys = KeyRing.generate()
    write_key_file(tmp_path / "key", keys.keys)
    series = generate_series(num_slices=4, rows=32, columns=32, uid_seed="worker-keys")
    paths = []
    for number, dataset in enumerate(series.datasets):
        paths.append(str(tmp_path / f"{number}.dcm"))
        save_dataset(dataset, Path(paths[-1]), keys)
    spec = JobSpec(1, "s", tuple(paths), ("threshold_segment",), {}, str(tmp_path / "out"))
    spec = dataclasses.replace(spec, key_file=tmp_path / "key")
    assert keys.keys[0] not in pickle.dumps(spec) and keys.keys[0].hex() not in repr(spec)
    records = run_job(spec).records
    assert {record.kind for record in records} == {"seg", "sr"}
    for record in records:
        assert record.path.read_bytes().startswith(MAGIC)
        assert read_dicom(record.path, keys).SOPInstanceUID == record.sop_instance_uid
    missing = dataclasses.replace(spec, key_file=tmp_path / "absent")
    with pytest.raises(JobError, match="key file not found"):
        run_job(missing)
