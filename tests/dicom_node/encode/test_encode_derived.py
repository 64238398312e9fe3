"""ImageResult -> derived series of the source's SOP class: valid, faithful, referenced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from encode_checks import problems, real_file, save
from pydicom.dataset import Dataset

from dicom_node.encode.common import EncodeError
from dicom_node.encode.derived import encode_derived
from dicom_node.encode.uids import Provenance
from dicom_node.synthetic import generate_series
from dicom_node.volume import load_series
from processors.api import run_processor
from processors.base import ImageResult, Volume

GAUSSIAN = Provenance("gaussian", "1.0.0", "denoise", {"sigma_mm": 1.0})
WINDOW = Provenance("window", "1.0.0", "enhance", {"preset": "lung"})


def check_derived(
    outputs: list[Dataset],
    sources: list[Dataset],
    result: ImageResult,
    tmp_path: Path,
    source_path: Path | None = None,
) -> list[Dataset]:
    """Write, validate and read back; check header linkage and values; return the reads."""
    by_uid = {d.SOPInstanceUID: d for d in sources}
    reads = []
    for z, ds in enumerate(outputs):
        path = save(ds, tmp_path / f"{z:04d}.dcm")
        if z == 0:
            assert problems(path, source=source_path) == []
        back = pydicom.dcmread(path)
        source = by_uid[result.volume.sop_instance_uids[z]]
        assert back.SOPClassUID == source.SOPClassUID
        assert list(back.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert back.SeriesInstanceUID != source.SeriesInstanceUID
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert back.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert back.ImagePositionPatient == source.ImagePositionPatient
        assert back.ImageOrientationPatient == source.ImageOrientationPatient
        assert back.PixelSpacing == source.PixelSpacing
        assert len(back.DerivationCodeSequence) == 1
        equipment = back.ContributingEquipmentSequence[0]
        assert equipment.Manufacturer == "dicom-node"
        values = back.pixel_array * float(back.get("RescaleSlope", 1)) + float(
            back.get("RescaleIntercept", 0)
        )
        if "RescaleSlope" in back:
            step = float(back.RescaleSlope)
            assert np.abs(values - result.volume.array[z]).max() <= step / 2 + 1e-6
        reads.append(back)
    assert len({d.SOPInstanceUID for d in reads}) == len(reads)
    assert len({d.SeriesInstanceUID for d in reads}) == 1
    return reads


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_denoised_series(modality: str, tmp_path: Path) -> None:
    series = generate_series(modality=modality, num_slices=4, rows=64, columns=64, uid_seed="d")
    volume = load_series(series.datasets)
    result = run_processor("gaussian", volume, sigma_mm=1.0)[0]
    assert isinstance(result, ImageResult)
    outputs = encode_derived(result, series.datasets, GAUSSIAN)
    reads = check_derived(outputs, series.datasets, result, tmp_path)
    assert "gaussian 1.0.0" in reads[0].DerivationDescription
    assert '"sigma_mm":1.0' in reads[0].DerivationDescription
    assert reads[0].DerivationCodeSequence[0].CodeMeaning == "Smoothing"
    if modality == "CT":  # the source rescale still represents the values: kept
        assert float(reads[0].RescaleIntercept) == -1024 and float(reads[0].RescaleSlope) == 1
    else:  # no rescale in MR: rounded to integers in place
        assert "RescaleSlope" not in reads[0]
        assert np.abs(reads[0].pixel_array - result.volume.array[0]).max() <= 0.5
    again = encode_derived(result, series.datasets, GAUSSIAN)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in outputs]


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_windowed_values_in_0_1_are_rescaled(modality: str, tmp_path: Path) -> None:
    series = generate_series(modality=modality, num_slices=3, rows=64, columns=64, uid_seed="w")
    volume = load_series(series.datasets)
    result = run_processor("window", volume, preset="lung")[0]
    assert isinstance(result, ImageResult)
    outputs = encode_derived(result, series.datasets, WINDOW)
    reads = check_derived(outputs, series.datasets, result, tmp_path)
    if modality == "CT":
        assert float(reads[0].RescaleSlope) < 0.01  # 0..1 spread over the stored range
        assert "WindowCenter" not in reads[0]
    else:
        assert "values stored as" in reads[0].DerivationDescription
        values = np.asarray(result.volume.array, dtype=np.float64)
        lo, hi = values.min(), values.max()
        expected = np.rint((values - lo) / ((hi - lo) / 4095))
        assert np.array_equal(np.stack([d.pixel_array for d in reads]), expected)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_files(name: str, tmp_path: Path) -> None:
    source_path, source = real_file(name)
    volume = load_series([source])
    result = run_processor("gaussian", volume, sigma_mm=1.0)[0]
    assert isinstance(result, ImageResult)
    outputs = encode_derived(result, [source], GAUSSIAN)
    check_derived(outputs, [source], result, tmp_path, source_path=source_path)


def test_refusals() -> None:
    series = generate_series(num_slices=2, rows=32, columns=32, uid_seed="r")
    volume = load_series(series.datasets)
    bad = ImageResult(volume.with_array(np.full(volume.shape, np.nan, dtype=np.float32)), "nan")
    with pytest.raises(EncodeError, match="NaN"):
        encode_derived(bad, series.datasets, GAUSSIAN)
    bare = ImageResult(Volume(np.zeros(volume.shape)), "bare")
    with pytest.raises(EncodeError, match="no source instance UIDs"):
        encode_derived(bare, series.datasets, GAUSSIAN)


def test_a_series_that_grew_gets_new_uids_for_every_derived_instance() -> None:
    """A study completed again with more slices: the same source series, one more instance.
    Each derived slice's stored values depend on the whole volume (its rescale, the 3-D
    filter), so none keeps its UID; the same instances again give the same UIDs."""
    series = generate_series(modality="CT", num_slices=5, rows=32, columns=32, uid_seed="g")

    def derived_uids(datasets: list[Dataset]) -> tuple[str, list[str]]:
        result = run_processor("gaussian", load_series(datasets), sigma_mm=1.0)[0]
        assert isinstance(result, ImageResult)
        outputs = encode_derived(result, datasets, GAUSSIAN)
        return outputs[0].SeriesInstanceUID, [d.SOPInstanceUID for d in outputs]

    first_series, first = derived_uids(series.datasets[:4])
    grown_series, grown = derived_uids(series.datasets)
    assert derived_uids(list(reversed(series.datasets[:4]))) == (first_series, first)
    assert grown_series != first_series
    assert len(grown) == 5 and not set(grown) & set(first)
