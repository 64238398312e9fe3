"""Logs carry no patient values: what pydicom says about an invalid value stays quiet
above DEBUG."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
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


JSON_LOGGING_SCRIPT = """
import logging, threading, warnings
import structlog
from dicom_node.logging import configure_logging

configure_logging("INFO", "json")
try:
    1 / 0
except ZeroDivisionError:
    structlog.get_logger("node").exception("node failed", job_id=3)
    logging.getLogger("uvicorn.error").exception("library failed")
logging.getLogger("distributed.worker").warning("worker %s gone", "w1")
warnings.warn("library warns", RuntimeWarning)
thread = threading.Thread(target=lambda: {}["missing"])
thread.start()
thread.join()
raise SystemError("the process ends")
"""


def test_json_logs_are_one_object_per_line_with_tracebacks_inside() -> None:
    """The node's lines, the libraries' records and warnings, and uncaught exceptions
    (a thread's, the process's) each one JSON object on one line."""
    ended = subprocess.run(
        [sys.executable, "-c", JSON_LOGGING_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ended.returncode != 0
    lines = ended.stderr.splitlines()
    entries = [json.loads(line) for line in lines]
    assert [entry["event"].split(":")[-1].strip() for entry in entries] == [
        "node failed",
        "library failed",
        "worker w1 gone",
        "library warns",
        "uncaught exception",
        "uncaught exception",
    ]
    levels = ["error", "error", "warning", "warning", "error", "error"]
    assert [entry["level"] for entry in entries] == levels
    tracebacks = [entry.get("exception", "") for entry in entries]
    assert "ZeroDivisionError" in tracebacks[0] and "ZeroDivisionError" in tracebacks[1]
    assert "KeyError: 'missing'" in tracebacks[4]
    assert "SystemError: the process ends" in tracebacks[5]
    assert entries[1]["logger"] == "uvicorn.error" and entries[0]["job_id"] == 3
