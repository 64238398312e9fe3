from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.storage import is_valid_uid
from dicom_node.synthetic import CORONAL, HU_LESION, generate_series
from dicom_node.testing import require_tool


def test_ct_is_hounsfield_with_known_truth() -> None:
    series = generate_series(num_slices=12, rows=96, columns=96, pixel_spacing=3.0, seed=1)
    volume = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in series.datasets]
    )
    labels = series.phantom.labels
    assert volume.shape == (12, 96, 96)
    assert abs(np.median(volume[~labels["body"]]) + 1000) < 10
    assert abs(np.median(volume[labels["lung"]]) + 850) < 10
    assert abs(np.median(volume[labels["bone"]]) - 700) < 10
    assert abs(np.median(volume[labels["lesion"]]) - HU_LESION) < 10
    assert labels["lesion"].sum() > 0 and not (labels["lesion"] & labels["lung"]).any()


def test_geometry_and_uids_are_consistent() -> None:
    series = generate_series(num_slices=5, rows=32, columns=32, slice_thickness=2.0)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in series.datasets])
    assert np.allclose(np.diff(positions[:, 2]), 2.0)
    uids = [d.SOPInstanceUID for d in series.datasets]
    assert len(set(uids)) == 5 and all(is_valid_uid(u) for u in uids)
    assert {d.SeriesInstanceUID for d in series.datasets} == {series.series_instance_uid}


def test_coronal_series_steps_along_its_normal() -> None:
    series = generate_series(num_slices=3, rows=32, columns=32, orientation=CORONAL)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in series.datasets])
    assert np.allclose(np.diff(positions, axis=0), [[0, 2.5, 0]] * 2)


def test_uid_seed_is_reproducible() -> None:
    first = generate_series(num_slices=2, rows=16, columns=16, uid_seed="x")
    second = generate_series(num_slices=2, rows=16, columns=16, uid_seed="x")
    assert [d.SOPInstanceUID for d in first.datasets] == [d.SOPInstanceUID for d in second.datasets]


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_generated_files_pass_dciodvfy(tmp_path: Path, modality: str) -> None:
    series = generate_series(modality=modality, num_slices=2, rows=64, columns=64)
    path = series.write(tmp_path)[0]
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    report = result.stdout + result.stderr
    problems = [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]
    assert problems == []
    assert dcmread(path).Modality == modality
