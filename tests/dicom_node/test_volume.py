"""Loading a series into a Volume: ordering, rescale, compression, multi-frame, errors."""

from __future__ import annotations

import copy
import random

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from dicom_node.synthetic import CORONAL, generate_series
from dicom_node.volume import SeriesError, datasets_to_volume, load_directory, load_series


@pytest.fixture(scope="module")
def series():
    return generate_series(num_slices=10, rows=32, columns=40, seed=2, uid_seed="vol")


def test_order_by_position_not_instance_number(series):
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    random.Random(1).shuffle(datasets)
    for number, ds in enumerate(datasets):  # InstanceNumber now contradicts the geometry
        ds.InstanceNumber = 100 - number
    volume = datasets_to_volume(datasets)
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series.datasets)
    np.testing.assert_array_equal(volume.array, np.rint(series.phantom.values))
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert volume.origin == pytest.approx(
        tuple(float(v) for v in series.datasets[0].ImagePositionPatient)
    )
    assert volume.modality == "CT"
    assert volume.series_instance_uid == series.series_instance_uid
    assert volume.frame_of_reference_uid == series.datasets[0].FrameOfReferenceUID
    assert volume.array.dtype == np.float32


def test_files_on_disk(series, tmp_path):
    paths = series.write(tmp_path / "s")
    volume = load_directory(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, np.rint(series.phantom.values))
    assert load_series(reversed(paths)).sop_instance_uids == volume.sop_instance_uids


def test_rescale_to_hu(series):
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    for ds in datasets:  # stored = HU / 2 + 512, so slope 2 and intercept -1024
        raw = np.frombuffer(ds.PixelData, dtype=np.int16).astype(np.float64) - 1024.0
        ds.PixelData = np.rint(raw / 2 + 512).astype(np.int16).tobytes()
        ds.RescaleSlope = 2
        ds.RescaleIntercept = -1024
    volume = datasets_to_volume(datasets)
    np.testing.assert_allclose(volume.array, np.rint(series.phantom.values), atol=1.0)


def test_coronal_series_sorted_along_its_normal():
    series = generate_series(
        num_slices=6, rows=16, columns=20, orientation=CORONAL, modality="MR", seed=1
    )
    volume = datasets_to_volume(list(reversed(series.datasets)))
    assert volume.orientation == pytest.approx(CORONAL)
    assert volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series.datasets)
    assert volume.modality == "MR"


def test_compressed_series_is_decoded(series):
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    for ds in datasets:
        ds.compress(RLELossless)
    assert datasets[0].file_meta.TransferSyntaxUID == RLELossless
    volume = datasets_to_volume(datasets)
    np.testing.assert_array_equal(volume.array, np.rint(series.phantom.values))


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "CT_small.dcm", "MR_small_RLE.dcm"])
def test_real_single_files(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    assert volume.shape == (1, ds.Rows, ds.Columns)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    np.testing.assert_allclose(volume.array[0], expected)
    assert volume.series_instance_uid == ds.SeriesInstanceUID
    assert volume.modality == ds.Modality


def test_missing_uids_are_none(series):
    bare = copy.deepcopy(series.datasets[0])
    del bare.SeriesInstanceUID, bare.StudyInstanceUID, bare.FrameOfReferenceUID, bare.Modality
    volume = datasets_to_volume([bare])
    assert volume.series_instance_uid is None and volume.study_instance_uid is None
    assert volume.frame_of_reference_uid is None and volume.modality == "OT"


def test_enhanced_multiframe_ct(series):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    multi = LegacyConvertedEnhancedCTImage(
        series.datasets,
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    volume = datasets_to_volume([multi])
    np.testing.assert_array_equal(volume.array, np.rint(series.phantom.values))
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert set(volume.sop_instance_uids) == {multi.SOPInstanceUID}
    assert sorted(volume.source_frame_numbers) == list(range(1, 11))


def test_multiframe_without_geometry_is_refused():
    with pytest.raises(SeriesError, match="PerFrameFunctionalGroupsSequence"):
        load_series([get_testdata_file("emri_small.dcm")])


def test_missing_slice(series):
    datasets = [ds for i, ds in enumerate(series.datasets) if i != 4]
    with pytest.raises(SeriesError, match="about 1 missing slice"):
        datasets_to_volume(datasets)


def test_mixed_orientations(series):
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0.8660254, -0.5]
    with pytest.raises(SeriesError, match="mixed orientations"):
        datasets_to_volume(datasets)


def test_inconsistent_sizes(series):
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    datasets[2].Rows = 16
    datasets[2].PixelData = datasets[2].PixelData[: 16 * 40 * 2]
    with pytest.raises(SeriesError, match="inconsistent image sizes"):
        datasets_to_volume(datasets)


def test_duplicate_positions(series):
    datasets = [copy.deepcopy(ds) for ds in series.datasets]
    datasets[5].ImagePositionPatient = datasets[4].ImagePositionPatient
    with pytest.raises(SeriesError, match="same position"):
        datasets_to_volume(datasets)


def test_mixed_series_and_no_geometry(series):
    other = copy.deepcopy(series.datasets[0])
    other.SeriesInstanceUID = "1.2.3"
    with pytest.raises(SeriesError, match="2 series"):
        datasets_to_volume([*series.datasets[1:], other])
    bare = copy.deepcopy(series.datasets[0])
    del bare.ImagePositionPatient
    with pytest.raises(SeriesError, match="no ImagePositionPatient"):
        datasets_to_volume([bare])
    with pytest.raises(SeriesError, match="no instances"):
        datasets_to_volume([])


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not dicom at all")
    with pytest.raises(SeriesError, match="not a readable DICOM file"):
        load_series([path])
