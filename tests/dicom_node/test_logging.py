"""Logs carry no patient values: what pydicom says about an invalid value stays quiet
above DEBUG."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset

from dicom_node.logging import VALUE_NAMING_LIBRARIES, keep_patient_values_out_of_logs

BIRTH_DATE = "1961-04-09"  # not a DICOM DA: pydicom warns, naming it


@pytest.fixture(autouse=True)
def library_levels_restored() -> Iterator[None]:
    yield
    for library in VALUE_NAMING_LIBRARIES:
        logging.getLogger(library).setLevel(logging.NOTSET)


def said_about_the_value(level: int, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep_patient_values_out_of_logs(level)
        Dataset().PatientBirthDate = BIRTH_DATE
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return [text for text in said if BIRTH_DATE in text]


def test_quiet_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    assert said_about_the_value(logging.INFO, caplog) == []


def test_heard_again_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    keep_patient_values_out_of_logs(logging.INFO)
    assert said_about_the_value(logging.DEBUG, caplog) != []
