from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from db.models import Pseudonym
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.security.deid import Deidentifier, DeidProfile
from dicom_node.security.keys import KeyRing
from dicom_node.security.reid import recall, reidentify, remember

KEYS = KeyRing((b"r" * 32,))


def ct() -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return dcmread(path)


def test_reidentify_restores_patient_study_and_referenced_uids() -> None:
    original = ct()
    ds = ct()
    record = Deidentifier(b"s" * 32, DeidProfile()).deidentify(ds)
    result = Dataset()
    result.PatientName, result.PatientID = ds.PatientName, ds.PatientID
    result.StudyInstanceUID = ds.StudyInstanceUID
    result.SOPInstanceUID = "2.25.1234"  # the result's own UID: not in the map
    result.PatientIdentityRemoved = "YES"
    reference = Dataset()
    reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedInstanceSequence = [reference]
    result.ReferencedSeriesSequence = [series]
    assert reidentify(result, record) == 3
    assert result.PatientName == original.PatientName
    assert result.PatientID == original.PatientID
    assert result.StudyInstanceUID == original.StudyInstanceUID
    assert result.StudyDate == original.StudyDate
    assert result.SOPInstanceUID == "2.25.1234"
    restored = result.ReferencedSeriesSequence[0]
    assert restored.SeriesInstanceUID == original.SeriesInstanceUID
    assert (
        restored.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    )
    assert "PatientIdentityRemoved" not in result


def test_the_map_is_sealed_merged_per_study_and_recalled(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    deidentifier = Deidentifier(b"s" * 32, DeidProfile())
    first, second = ct(), ct()
    second.SOPInstanceUID = second.SOPInstanceUID + ".2"
    records = [deidentifier.deidentify(first), deidentifier.deidentify(second)]
    session: Session
    with sessions.begin() as session:
        for record in records:
            remember(session, KEYS, "outside-ai", record)
    with sessions() as session:
        rows = session.query(Pseudonym).all()
        assert len(rows) == 1
        assert b"CompressedSamples" not in rows[0].sealed
        assert b"1.3.6.1.4.1.5962" not in rows[0].sealed
        found = recall(session, KEYS, first.StudyInstanceUID)
        assert recall(session, KEYS, "2.25.1") is None
    assert found is not None
    destination, record = found
    assert destination == "outside-ai"
    assert record.uids[first.SOPInstanceUID] != record.uids[second.SOPInstanceUID]
    assert {first.SOPInstanceUID, second.SOPInstanceUID} <= set(record.uids)
