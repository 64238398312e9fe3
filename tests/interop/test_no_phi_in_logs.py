"""No patient data in any log above DEBUG: real and generated files with known, unusual
names, IDs and dates go through the whole loop (storescu -> node -> jobs on Dask workers
-> exports to Orthanc), with refusals and failures on the way, and every line the node
and its workers logged at INFO is searched for them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from orchestration_support import (
    install_test_plugins,
    plugin_env,
    wait_for_exports,
    wait_for_jobs,
    write_config,
)
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.synthetic import generate_series
from dicom_node.testing import OrthancProcess, running_orthanc, start_node, storescu

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PATIENT_NAME = "Quixozanbar^Wilhelmyna^Theodora"
PATIENT_ID = "PID-77Q41Z"
BIRTH_DATE = "19230417"
ACCESSION = "ACC9913472"
REFERRING = "Drevnikov^Oksanthe"
OTHER_NAME = "Marzipanova^Ludwiga"
OTHER_ID = "PID-55K09X"
# Each value, and the parts a formatter might print on their own.
SEARCHED = [
    PATIENT_NAME,
    "Quixozanbar",
    "Wilhelmyna",
    PATIENT_ID,
    BIRTH_DATE,
    "1923-04-17",
    ACCESSION,
    "Drevnikov",
    "Marzipanova",
    OTHER_ID,
]
RULES = """
[[rules]]
name = "ct-default"
match = { Modality = "CT" }
pipeline = ["gaussian", "threshold_segment", "kmeans", "features"]
destinations = ["pacs"]

[[rules]]
name = "mr-fails"
match = { Modality = "MR" }
pipeline = ["fail_raise"]
destinations = ["pacs"]
"""


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def with_patient(path: Path, out: Path, name: str, patient_id: str) -> Path:
    dataset = pydicom.dcmread(path)
    dataset.PatientName = name
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = BIRTH_DATE
    dataset.AccessionNumber = ACCESSION
    dataset.ReferringPhysicianName = REFERRING
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(out)
    return out


def test_no_patient_data_in_any_log_at_info(tmp_path: Path, orthanc: OrthancProcess) -> None:
    config = write_config(
        tmp_path / "node.toml",
        orthanc,
        RULES,
        study_quiet_seconds=1.0,
        dask_workers=1,
        receiver_processes=2,
        log_level="INFO",
    )
    plugins = plugin_env(install_test_plugins(tmp_path / "plugins"))
    node = start_node(tmp_path / "data", config=config, env=plugins)
    try:
        series = generate_series(
            num_slices=12,
            rows=64,
            columns=64,
            uid_seed="no-phi",
            patient_name=PATIENT_NAME,
            patient_id=PATIENT_ID,
        )
        for dataset in series.datasets:
            dataset.PatientBirthDate = BIRTH_DATE
            dataset.AccessionNumber = ACCESSION
            dataset.ReferringPhysicianName = REFERRING
        files = series.write(tmp_path / "ct")
        real = tmp_path / "real"
        real.mkdir()
        files += [
            with_patient(Path(get_testdata_file(name)), real / name, OTHER_NAME, OTHER_ID)  # type: ignore[arg-type]
            for name in ("CT_small.dcm", "MR_small.dcm")
        ]
        # Refused on the way in: a data set whose study UID is not a UID.
        broken = pydicom.dcmread(files[0])
        broken.StudyInstanceUID = "not-a-uid"
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        broken.save_as(real / "broken.dcm")
        result = storescu([*files, real / "broken.dcm"], node.port, called_ae="DICOMNODE")
        assert result.returncode != 0, "storescu reported no failed store"

        jobs = wait_for_jobs(node, 3, ("succeeded", "failed"), timeout=180)
        assert {job["state"] for job in jobs} == {"succeeded", "failed"}  # the MR job fails
        assert wait_for_exports(node)
    finally:
        node.stop()
    logs = {node.log_path: node.log()}
    logs.update({path: path.read_text(errors="replace") for path in tmp_path.rglob("*.log")})
    assert sum(len(text.splitlines()) for text in logs.values()) > 20, "nothing was logged"
    found = [
        (path.name, value)
        for path, text in logs.items()
        for value in SEARCHED
        if value.lower() in text.lower()
    ]
    assert found == [], f"patient data in the logs: {found}"
