"""What the encoders share: source values highdicom would refuse, and its messages."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_node.encode.common import blank_unparseable_values, refused_by_highdicom


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the test's own bad values
def test_unparseable_dates_and_times_are_emptied_and_named_by_keyword() -> None:
    dataset = Dataset()
    dataset.PatientName = "Doe^Jane"
    dataset.PatientBirthDate = "1961-04-09"
    dataset.StudyDate = "20240102"
    dataset.StudyTime = "25:61"
    dataset.AcquisitionDateTime = "20240102120000"
    dataset.add_new(0x00091010, "DA", "not a date")  # private: left to the PACS
    other = Dataset()
    other.PatientBirthDate = "19610409"
    other.ContentDate = ["20240102", "2024-13-01"]
    other.AcquisitionDate = ["20240102", "20240103"]  # several valid values: kept

    assert blank_unparseable_values([dataset, other]) == [
        "PatientBirthDate",
        "StudyTime",
        "ContentDate",
    ]
    assert (dataset.PatientBirthDate, dataset.StudyTime) == ("", "")
    assert (dataset.StudyDate, dataset.AcquisitionDateTime) == ("20240102", "20240102120000")
    assert dataset.PatientName == "Doe^Jane" and dataset[0x00091010].value == "not a date"
    assert other.PatientBirthDate == "19610409" and other.ContentDate == ""
    assert other.AcquisitionDate == ["20240102", "20240103"]


def test_highdicoms_message_keeps_no_quoted_value() -> None:
    error = ValueError("Unable to convert '1961-04-09' to 'DA' object for \"Doe^Jane\"")
    message = str(refused_by_highdicom("the segmentation", error))
    assert "1961" not in message and "Doe" not in message
    assert message.startswith("highdicom refused the segmentation: Unable to convert '<value>'")


def test_an_attribute_error_keeps_its_names() -> None:
    error = AttributeError("'Dataset' object has no attribute 'PatientID'")
    message = str(refused_by_highdicom("the measurement report", error))
    assert message.endswith("'Dataset' object has no attribute 'PatientID'")
