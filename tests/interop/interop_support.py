"""Helpers for the interop tests (a module of its own: every test folder has a conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dicom_node.testing import NodeProcess


def cli_json(node: NodeProcess, *args: str) -> object:
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args, "--json"],
        env=node.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(result.stdout)


def wait_for_study(
    node: NodeProcess, study_instance_uid: str, expected: int, timeout: float = 30.0
) -> dict[str, object]:
    """The study's row from `dicom-node studies --json` once it has ``expected`` instances."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        studies: list[dict[str, object]] = cli_json(node, "studies")  # type: ignore[assignment]
        found = [s for s in studies if s["study_instance_uid"] == study_instance_uid]
        if found and found[0]["num_instances"] == expected:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"expected {expected} instances of {study_instance_uid}, have {found}")


def with_new_uids(dataset, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Save a copy of ``dataset`` as a new study/series/instance."""
    import copy

    from pydicom.uid import generate_uid

    fresh = copy.deepcopy(dataset)
    fresh.StudyInstanceUID = generate_uid()
    fresh.SeriesInstanceUID = generate_uid()
    fresh.SOPInstanceUID = fresh.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    fresh.save_as(path, enforce_file_format=True)
    return path
