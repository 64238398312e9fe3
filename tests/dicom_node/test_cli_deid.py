"""``dicom-node deidentify`` on real files from pydicom's test data and pydicom-data."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.security.keys import write_key_file
from dicom_node.testing import require_tool

runner = CliRunner()
# An image with private tags, a SEG, an SR, an RT plan, a CT from pydicom-data.
FILES = ("CT_small.dcm", "liver.dcm", "test-SR.dcm", "rtplan.dcm", "693_UNCI.dcm")
OPTIONS = ("--option", "retain-longitudinal-dates", "--option", "retain-patient-characteristics")
BOTH_DATE_OPTIONS = (
    "--option",
    "retain-longitudinal-dates",
    "--option",
    "retain-longitudinal-full-dates",
)
PHI = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber")


def data_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def phi_values(path: Path) -> set[bytes]:
    ds = dcmread(path, force=True)
    values: set[bytes] = set()
    for element in ds.iterall():
        if element.keyword in PHI and element.value not in (None, ""):
            values.update(part.encode() for part in str(element.value).split("^") if len(part) >= 4)
    return values


def dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    # Values in the messages differ (UIDs, dates): compare what each error is about.
    return {re.sub(r"<[^>]*>|[\d.]+", "", line) for line in lines if line.startswith("Error")}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in FILES:
        shutil.copy(data_file(name), folder / name.removesuffix(".dcm"))  # no .dcm suffix
    # One without the 128-byte preamble and DICM prefix.
    (folder / "no-preamble").write_bytes(data_file("MR_small.dcm").read_bytes()[132:])
    (folder / "notes.txt").write_text("not DICOM")
    return folder


def test_deidentify_writes_valid_files_without_phi(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    key_file = tmp_path / "key"
    write_key_file(key_file, [b"k" * 32])
    result = runner.invoke(
        app,
        [
            "deidentify",
            str(source),
            "-o",
            str(out),
            "--key-file",
            str(key_file),
            "--option",
            "retain-longitudinal-dates",
            "--option",
            "retain-patient-characteristics",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "de-identified 6 of 6 instances" in result.output
    assert "skipped" in result.output and "notes.txt" in result.output
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 6
    originals = {
        dcmread(path, force=True).SOPInstanceUID: path
        for path in source.iterdir()
        if path.name != "notes.txt"
    }
    phi = set().union(*(phi_values(path) for path in originals.values()))
    for path in written:
        data = path.read_bytes()
        assert not [value for value in phi if value in data], path
        ds = dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID not in originals
    segmentation = next(p for p in written if dcmread(p).Modality == "SEG")
    assert hd.seg.segread(segmentation).PatientIdentityRemoved == "YES"
    image = next(p for p in written if dcmread(p).Modality == "CT")
    assert hd.imread(image).SOPInstanceUID == dcmread(image).SOPInstanceUID


def test_dciodvfy_finds_no_error_the_source_lacks(tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "liver.dcm", "test-SR.dcm"):
        out = tmp_path / name
        result = runner.invoke(app, ["deidentify", str(data_file(name)), "-o", str(out)])
        assert result.exit_code == 0, result.output
        (written,) = out.rglob("*.dcm")
        assert dciodvfy_errors(written) <= dciodvfy_errors(data_file(name)), name


def test_the_same_key_gives_the_same_pseudonyms(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    write_key_file(key_file, [b"k" * 32])
    runs = []
    for run in ("a", "b"):
        args = ["deidentify", str(data_file("CT_small.dcm")), "-o", str(tmp_path / run)]
        assert runner.invoke(app, [*args, "--key-file", str(key_file)]).exit_code == 0
        runs.append(sorted(p.relative_to(tmp_path / run) for p in (tmp_path / run).rglob("*.dcm")))
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deidentify", "/no/such/place", "-o", "OUT"], "no such file or folder"),
        (["deidentify", "NOTES", "-o", "OUT"], "no DICOM instances found"),
        (["deidentify", "US", "-o", "OUT"], "1 instances refused"),
        (["deidentify", "US", "-o", "OUT", "--key-file", "NOTES"], "not base64"),
        (
            [
                "deidentify",
                "US",
                "-o",
                "OUT",
                "--option",
                "retain-longitudinal-dates",
                "--option",
                "retain-longitudinal-full-dates",
            ],
            "exclude each other",
        ),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    replace = {
        "NOTES": str(notes),
        "US": str(data_file("US1_UNCR.dcm")),
        "OUT": str(tmp_path / "o"),
    }
    result = runner.invoke(app, [replace.get(arg, arg) for arg in args])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def test_allow_burned_in_writes_an_ultrasound(tmp_path: Path) -> None:
    args = ["deidentify", str(data_file("US1_UNCR.dcm")), "-o", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "--allow-burned-in"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "o").rglob("*.dcm"))) == 1
