"""Helpers shared by the encoder tests: dciodvfy reports, real test files, small series."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.testing import require_tool

#: The node's private coding scheme (PS3.16 allows "99"-prefixed private designators, and
#: every output declares it in CodingSchemeIdentificationSequence); dciodvfy only knows the
#: standard designators, so it warns "Unrecognized defined term <99DCMNODE>". Tolerated
#: only where a test uses a processor that emits a local concept (predict's target).
PRIVATE_SCHEME_WARNING = "Unrecognized defined term <99DCMNODE> for value 1 of attribute"


def dciodvfy(path: Path) -> list[str]:
    """Every Error and Warning line dciodvfy prints for ``path``."""
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    report = result.stdout + result.stderr
    return [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]


def problems(
    path: Path, source: Path | None = None, allow_private_scheme: bool = False
) -> list[str]:
    """dciodvfy problems of ``path`` that are not explained.

    With ``source``, a warning the source file itself gets (a real test file's empty
    Laterality, zero Patient's Weight, retired PN form) is inherited patient/study/series
    data that an output must copy unchanged, so it is not counted; errors always count.
    """
    inherited = set(dciodvfy(source)) if source is not None else set()
    out = []
    for line in dciodvfy(path):
        if line.startswith("Warning") and line in inherited:
            continue
        if allow_private_scheme and PRIVATE_SCHEME_WARNING in line:
            continue
        out.append(line)
    return out


def real_file(name: str) -> tuple[Path, Dataset]:
    path = Path(get_testdata_file(name))  # never get_testdata_files('*'): network
    return path, pydicom.dcmread(path)


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
