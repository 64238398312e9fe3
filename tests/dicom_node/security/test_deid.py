from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.security.deid import (
    BurnedInAnnotationError,
    DeidentificationError,
    Deidentifier,
    DeidProfile,
    secret_from,
)
from dicom_node.security.deid_options import DeidOption
from dicom_node.security.keys import KeyRing

SECRET = b"k" * 32
MODIFIED = DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyID",
)
FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "liver.dcm", "test-SR.dcm")


def read(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None
    return dcmread(path)


def written(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def phi_values(ds: Dataset) -> set[str]:
    values: set[str] = set()
    manufacturer = str(ds.get("Manufacturer", ""))  # not identifying, kept (MR_small: TOSHIBA)
    for element in ds.iterall():
        if element.keyword in PHI_KEYWORDS and element.value not in (None, ""):
            text = str(element.value)
            parts = text.replace("^", " ").split()
            values.update(part for part in parts if len(part) >= 4 and part not in manufacturer)
    return values


@pytest.mark.parametrize("name", FILES)
def test_no_original_phi_value_remains_in_the_output_bytes(name: str) -> None:
    ds = read(name)
    originals = phi_values(ds)
    assert originals, "the test file has patient data to remove"
    Deidentifier(SECRET, DeidProfile(allow_burned_in=True)).deidentify(ds)
    output = written(ds)
    for value in originals:
        assert value.encode() not in output, value
    back = dcmread(io.BytesIO(output))
    assert back.PatientIdentityRemoved == "YES"
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID


def test_pixel_data_is_untouched_and_private_elements_are_removed() -> None:
    ds = read("CT_small.dcm")
    pixels = ds.PixelData
    assert any(element.tag.is_private for element in ds.iterall())
    Deidentifier(SECRET, DeidProfile()).deidentify(ds)
    assert ds.PixelData == pixels
    assert not any(element.tag.is_private for element in ds.iterall())


def test_retain_safe_private_keeps_only_the_listed_elements() -> None:
    ds = read("CT_small.dcm")
    creator = str(ds[0x00090010].value)
    listed = [e.tag for e in ds if e.tag.group == 0x0009 and e.tag.element >> 8 == 0x10]
    profile = DeidProfile(
        frozenset({DeidOption.RETAIN_SAFE_PRIVATE}),
        safe_private=frozenset({(creator, listed[0].element & 0xFF)}),
    )
    Deidentifier(SECRET, profile).deidentify(ds)
    private = [e.tag for e in ds.iterall() if e.tag.is_private]
    assert sorted(private) == sorted([listed[0], ds[0x00090010].tag])


def test_uids_are_replaced_consistently_and_repeatably_with_the_same_key() -> None:
    first, second, third = read("CT_small.dcm"), read("CT_small.dcm"), read("CT_small.dcm")
    study, instance = first.StudyInstanceUID, first.SOPInstanceUID
    record = Deidentifier(SECRET, DeidProfile()).deidentify(first)
    Deidentifier(SECRET, DeidProfile()).deidentify(second)
    Deidentifier(b"o" * 32, DeidProfile()).deidentify(third)
    assert first.StudyInstanceUID == second.StudyInstanceUID != study
    assert first.StudyInstanceUID.startswith("2.25.") and len(first.StudyInstanceUID) <= 64
    assert third.StudyInstanceUID != first.StudyInstanceUID
    assert record.pseudonymous_study_uid == first.StudyInstanceUID
    assert record.uids[first.SOPInstanceUID] == instance
    assert record.uids[first.StudyInstanceUID] == study


def test_references_inside_sequences_get_the_same_pseudonymous_uids() -> None:
    ct = read("CT_small.dcm")
    reference = Dataset()
    reference.ReferencedSOPClassUID = ct.SOPClassUID
    reference.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    referencing = read("MR_small.dcm")
    referencing.ReferencedImageSequence = [reference]
    deidentifier = Deidentifier(SECRET, DeidProfile())
    deidentifier.deidentify(ct)
    deidentifier.deidentify(referencing)
    item = referencing.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert item.ReferencedSOPClassUID == ct.SOPClassUID  # class UIDs are not identifying


def day(text: str) -> dt.date:
    return dt.datetime.strptime(text, "%Y%m%d").date()


def test_dates_shift_by_the_same_days_for_one_patient_and_intervals_hold() -> None:
    ct, later = read("CT_small.dcm"), read("CT_small.dcm")
    later.SeriesDate = "20040201"
    interval = day(later.SeriesDate) - day(ct.SeriesDate)
    deidentifier = Deidentifier(SECRET, DeidProfile(frozenset({MODIFIED})))
    record = deidentifier.deidentify(ct)
    deidentifier.deidentify(later)
    assert 1 <= record.date_shift_days <= 3650
    assert day(ct.StudyDate) == day("20040119") - dt.timedelta(days=record.date_shift_days)
    assert day(later.SeriesDate) - day(ct.SeriesDate) == interval
    assert ct.LongitudinalTemporalInformationModified == "MODIFIED"


def test_basic_profile_empties_or_replaces_dates() -> None:
    ds = read("CT_small.dcm")
    Deidentifier(SECRET, DeidProfile()).deidentify(ds)
    assert ds.StudyDate in (None, "")
    assert ds.ContentDate == "19000101"  # Z/D: a dummy date keeps the IOD valid
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"


def test_method_and_code_sequence_name_the_profile_and_each_option() -> None:
    ds = read("CT_small.dcm")
    options = frozenset({MODIFIED, DeidOption.RETAIN_PATIENT_CHARACTERISTICS})
    Deidentifier(SECRET, DeidProfile(options)).deidentify(ds)
    codes = [
        (item.CodingSchemeDesignator, item.CodeValue)
        for item in ds.DeidentificationMethodCodeSequence
    ]
    assert codes == [("DCM", "113100"), ("DCM", "113107"), ("DCM", "113108")]
    assert "2024b" in ds.DeidentificationMethod[0]
    assert ds.PatientSex == "O"  # kept by Retain Patient Characteristics


def test_the_two_date_options_exclude_each_other() -> None:
    with pytest.raises(DeidentificationError, match="exclude each other"):
        DeidProfile(frozenset({MODIFIED, DeidOption.RETAIN_LONGITUDINAL_FULL_DATES}))


@pytest.mark.parametrize(
    ("name", "burned_in", "refused"),
    [
        ("US1_UNCR.dcm", None, True),  # ultrasound that does not say NO
        ("US1_UNCR.dcm", "NO", False),
        ("SC_rgb.dcm", None, True),  # secondary capture
        ("CT_small.dcm", "YES", True),
        ("CT_small.dcm", None, False),
    ],
)
def test_images_that_may_show_burned_in_text_are_refused(
    name: str, burned_in: str | None, refused: bool
) -> None:
    ds = read(name)
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    before = ds.PatientName
    deidentifier = Deidentifier(SECRET, DeidProfile())
    if refused:
        with pytest.raises(BurnedInAnnotationError, match="burned into its pixels"):
            deidentifier.deidentify(ds)
        assert ds.PatientName == before  # refused before anything changed
        Deidentifier(SECRET, DeidProfile(allow_burned_in=True)).deidentify(ds)
    else:
        deidentifier.deidentify(ds)
    assert ds.PatientIdentityRemoved == "YES"


def test_the_secret_comes_from_the_current_key(tmp_path: Path) -> None:
    ring = KeyRing((b"a" * 32, b"b" * 32))
    assert secret_from(ring) == secret_from(KeyRing((b"a" * 32,)))
    assert secret_from(ring) != secret_from(KeyRing((b"b" * 32, b"a" * 32)))
