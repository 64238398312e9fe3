"""dicom_node/image.py: 2-D and colour images from real files of pydicom's test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from dicom_node.image import (
    WHOLE_SLIDE_SOP_CLASS,
    ImageError,
    datasets_to_image,
    datasets_to_image_or_volume,
    read_image_file,
    ultrasound_spacing,
)
from tests.dicom_node.planar_files import region

#: A real CR (MONOCHROME1, ImagerPixelSpacing 0.1 mm) from pydicom's DICOMDIR test set.
CR = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/77654033/CR1/6154"


def data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in the installed pydicom test data"
    return Path(path)


def load(path: Path):  # type: ignore[no-untyped-def]
    return datasets_to_image_or_volume([read_image_file(path)])


def test_a_cr_is_a_2d_image_inverted_to_bright_dense_with_its_spacing_at_the_detector() -> None:
    ds = pydicom.dcmread(CR)
    image = load(CR)
    assert image.planar and not image.colour and image.shape == (1, 16, 16)
    assert image.spacing[1:] == (0.1, 0.1) and image.spacing_note == "at the detector"
    values = apply_modality_lut(ds.pixel_array, ds)
    ends = apply_modality_lut(np.array([0, 2 ** int(ds.BitsStored) - 1]), ds)
    expected = float(ends.min() + ends.max()) - values
    assert np.allclose(image.array[0], expected, atol=1e-3)
    assert image.region_size()[1].value == "mm2"


def test_the_magnification_factor_brings_imager_spacing_to_the_patient() -> None:
    ds = pydicom.dcmread(CR)
    ds.EstimatedRadiographicMagnificationFactor = 1.25
    image = datasets_to_image([ds])
    assert image.spacing[1:] == pytest.approx((0.08, 0.08))
    assert "EstimatedRadiographicMagnificationFactor" in image.spacing_note


def test_a_cr_without_file_meta_or_preamble_is_read_like_any_other(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    ds = pydicom.dcmread(CR)
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = bare.read_bytes()
    assert raw[128:132] != b"DICM"
    assert np.array_equal(load(bare).array, load(CR).array)


def test_a_real_file_without_file_meta_palette_colour_becomes_rgb() -> None:
    path = data("OT-PAL-8-face.dcm")
    assert path.read_bytes()[128:132] != b"DICM"
    image = load(path)
    assert image.colour and image.shape == (1, 480, 640)
    reference = pydicom.dcmread(path, force=True)
    reference.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    rgb = pydicom.pixels.apply_color_lut(reference.pixel_array, reference)
    assert np.allclose(image.array[0] * 65535.0, rgb, atol=0.5)


def test_a_modality_lut_sequence_is_applied_by_pydicom() -> None:
    path = data("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds
    assert np.array_equal(load(path).array[0], apply_modality_lut(ds.pixel_array, ds))


@pytest.mark.parametrize(
    ("encoded", "reference", "tolerance"),
    [
        ("US1_J2KR.dcm", "US1_UNCR.dcm", 0.0),  # JPEG 2000 lossless, YBR_RCT
        ("SC_rgb_rle.dcm", "SC_rgb.dcm", 0.0),  # RLE
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0.0),  # JPEG lossless
        ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 6 / 255),  # YBR_FULL
        ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb.dcm", 6 / 255),  # YBR_FULL_422
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 0.15),  # lossy JPEG baseline, YBR_FULL
    ],
)
def test_colour_encodings_decode_to_the_same_rgb(
    encoded: str, reference: str, tolerance: float
) -> None:
    image, truth = load(data(encoded)), load(data(reference))
    assert image.colour and image.planar
    assert float(np.abs(image.array - truth.array).max()) <= tolerance + 1e-6


def test_a_multiframe_ultrasound_is_a_stack_of_frames() -> None:
    image = load(data("OBXXXX1A_rle_2frame.dcm"))
    assert image.colour and image.shape == (2, 600, 800)
    assert image.source_frame_numbers == (1, 2) and len(set(image.sop_instance_uids)) == 1
    # One 2-D region in cm (0.0262 cm), beside a waveform region (seconds) that does not count.
    assert image.spacing_known and image.spacing[1:] == pytest.approx((0.2622878766, 0.2622878766))
    assert image.spacing_note == "SequenceOfUltrasoundRegions PhysicalDeltaX/Y in cm (one region)"


@pytest.mark.parametrize(
    ("name", "spacing", "note"),
    [
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", 0.25476696592, "(one region)"),
        ("gdcm-US-ALOKA-16.dcm", 0.38265306503, "(2 regions, the same spacing)"),
    ],
)
def test_ultrasound_regions_that_agree_give_the_spacing(
    name: str, spacing: float, note: str
) -> None:
    image = load(data(name))
    assert image.spacing_known and image.spacing[1:] == pytest.approx((spacing, spacing))
    assert image.spacing_note.endswith(note)


def test_an_ultrasound_region_outside_the_image_is_not_its_calibration() -> None:
    # A 240x320 cine whose region (columns 84..595) was written for a 640-wide matrix.
    image = load(data("examples_ybr_color.dcm"))
    assert not image.spacing_known and "outside the image" in image.spacing_note


def test_ultrasound_regions_rows_take_delta_y_and_disagreeing_regions_give_pixels() -> None:
    rows, columns = 200, 300
    one = ultrasound_spacing([region(0.01, 0.02, (0, 0, 299, 199))], rows, columns)
    assert one[0] == pytest.approx((0.2, 0.1))  # (row, column) in mm: Y, then X
    agree = [region(0.01, 0.02, (0, 0, 149, 199)), region(0.01, 0.02, (150, 0, 299, 199))]
    assert ultrasound_spacing(agree, rows, columns)[0] == pytest.approx((0.2, 0.1))
    disagree = [region(0.01, 0.02, (0, 0, 149, 199)), region(0.03, 0.03, (150, 0, 299, 199))]
    spacing, note = ultrasound_spacing(disagree, rows, columns)
    assert spacing is None and "different spacings" in note
    doppler = [region(0.01, 0.02, (0, 0, 299, 199), spatial_format=3)]
    spacing, note = ultrasound_spacing(doppler, rows, columns)
    assert spacing is None and "without a 2-D region in cm" in note


def test_jpeg_ls_greyscale_ultrasound_loads() -> None:
    image = load(data("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert image.planar and not image.colour and image.shape == (1, 768, 1024)


def test_a_ct_slice_stays_a_volume() -> None:
    assert not load(data("CT_small.dcm")).planar


def test_whole_slide_images_are_refused_by_name() -> None:
    ds = pydicom.dcmread(data("SC_rgb.dcm"))
    ds.SOPClassUID = WHOLE_SLIDE_SOP_CLASS
    with pytest.raises(ImageError, match="whole-slide"):
        datasets_to_image([ds])


def test_images_of_different_sizes_in_one_series_are_refused() -> None:
    small = pydicom.dcmread(CR)
    other = pydicom.dcmread(data("RG3_UNCR.dcm"))
    other.SeriesInstanceUID = small.SeriesInstanceUID
    with pytest.raises(ImageError, match="different sizes"):
        datasets_to_image([small, other])


def test_the_header_window_follows_a_monochrome1_inversion() -> None:
    ds = pydicom.dcmread(CR)
    ds.WindowCenter, ds.WindowWidth = 1000, 500
    image = datasets_to_image([ds])
    ends = apply_modality_lut(np.array([0, 2 ** int(ds.BitsStored) - 1]), ds)
    assert image.window == pytest.approx((float(ends.min() + ends.max()) - 1000, 500))


def test_a_voi_lut_from_the_header_is_applied_as_pydicom_does() -> None:
    from pydicom.pixels import apply_voi_lut

    from processors.api import run_processor
    from processors.base import ImageResult

    path = data("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    image = load(path)
    assert image.window is None and image.voi_lut is not None
    out = run_processor("window", image, preset="header")[0]
    assert isinstance(out, ImageResult)
    expected = apply_voi_lut(ds.pixel_array, ds) / 65535.0
    assert np.allclose(out.volume.array[0], expected, atol=1e-6)
