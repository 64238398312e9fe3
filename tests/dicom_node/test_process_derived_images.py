"""Derived images of 2-D sources through ``dicom-node process``: in the source's SOP class
(CR, DX and MG For Presentation, US), else Secondary Capture saying why; dciodvfy reports
no error on them that the source has not (``dicom_node/encode/planar_derived.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.cli import app
from dicom_node.image import datasets_to_image, read_image_file
from processors.api import run_processor
from processors.base import ImageResult
from tests.dicom_node.planar_files import DX, disc, mammogram
from tests.dicom_node.test_image import CR, data
from tests.dicom_node.test_process_images import SECONDARY_CAPTURE, errors, run, runner

DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def derived_of(out: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p)) for p in sorted(out.rglob("derived-*/*.dcm"))]


def source_file(name: str, tmp_path: Path) -> Path:
    if name == "DX":
        return DX
    if name == "MG":  # generated: no real MG file with a licence to commit was found
        pixels = np.full((256, 200), 300, np.uint16)
        pixels[disc((256, 200), (128, 100), 50)] = 3000
        return mammogram(tmp_path / "mg" / "mg.dcm", pixels)
    return CR if name == "CR" else data(name)


@pytest.mark.parametrize("pipeline", ["median", "clahe"])  # values kept / remapped
@pytest.mark.parametrize(
    "name",
    [
        "CR",  # CR Image, MONOCHROME1
        "DX",  # DX For Presentation, MONOCHROME1, 8 bits
        "MG",  # MG For Presentation, MONOCHROME2, 12 bits, generated
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # US Image, greyscale
        "US1_UNCR.dcm",  # US Image, RGB
        "OBXXXX1A_rle.dcm",  # US Image, palette colour
        "OBXXXX1A_rle_2frame.dcm",  # US Multi-frame, palette colour
        "examples_ybr_color.dcm",  # US Multi-frame, 30 frames YBR_FULL_422 JPEG
    ],
)
def test_derived_images_keep_the_source_sop_class(name: str, pipeline: str, tmp_path: Path) -> None:
    source = source_file(name, tmp_path)
    code, output, out = run(tmp_path, source, pipeline)
    assert code == 0, output
    src = pydicom.dcmread(source)
    derived = derived_of(out)
    assert len(derived) == 1, derived  # a multi-frame source gives one multi-frame instance
    path, ds = derived[0]
    assert ds.SOPClassUID == src.SOPClassUID and ds.Modality == src.Modality
    assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"]
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert int(ds.get("NumberOfFrames", 1)) == int(src.get("NumberOfFrames", 1))
    new = errors(path) - errors(source)
    assert not new, new
    if src.Modality == "US":
        # clahe takes a colour image's luminance: its result is greyscale.
        colour = src.PhotometricInterpretation != "MONOCHROME2" and pipeline == "median"
        assert ds.PhotometricInterpretation == ("RGB" if colour else "MONOCHROME2")
        assert ds.BitsAllocated == 8 and ds.BitsStored == 8
        assert ds.get("SequenceOfUltrasoundRegions") == src.get("SequenceOfUltrasoundRegions")
        assert "RedPaletteColorLookupTableData" not in ds
    else:
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
    if name in ("DX", "MG"):
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PresentationLUTShape == "IDENTITY"
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
        assert "WindowCenter" in ds and "WindowWidth" in ds
        flipped = -1 if src.PhotometricInterpretation == "MONOCHROME1" else 1
        assert ds.PixelIntensityRelationshipSign == flipped * src.PixelIntensityRelationshipSign
    if name == "MG":
        assert ds.ImageLaterality == src.ImageLaterality
        assert ds.ViewCodeSequence == src.ViewCodeSequence


def test_a_derived_radiograph_holds_the_processed_values_and_the_inverted_window(
    tmp_path: Path,
) -> None:
    code, output, out = run(tmp_path, DX, "median")
    assert code == 0, output
    ((_, ds),) = derived_of(out)
    src = pydicom.dcmread(DX)
    image = datasets_to_image([read_image_file(DX)])
    expected = run_processor("median", image)[0]
    assert isinstance(expected, ImageResult)
    assert np.array_equal(ds.pixel_array, np.rint(expected.volume.array[0]).astype(np.uint16))
    # MONOCHROME1 0..255 turned bright = dense: the window centre 128 becomes 255 - 128.
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (
        255.0 - float(src.WindowCenter),
        float(src.WindowWidth),
    )
    assert "VOILUTSequence" not in ds


def test_a_for_processing_radiograph_gives_secondary_capture_saying_why(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DX)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PROCESSING
    ds.PresentationIntentType = "FOR PROCESSING"
    source = tmp_path / "processing" / "dx.dcm"
    source.parent.mkdir()
    ds.save_as(source, enforce_file_format=True)
    code, output, out = run(tmp_path, source, "median")
    assert code == 0, output
    ((path, derived),) = derived_of(out)
    assert derived.SOPClassUID == SECONDARY_CAPTURE
    assert "For Processing" in derived.DerivationDescription
    assert not errors(path) - errors(source)


def test_a_stack_of_single_frame_ultrasound_images_gives_one_derived_image_each(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "stack"
    for number in (1, 2, 3):
        ds = pydicom.dcmread(data("JPGLosslessP14SV1_1s_1f_8b.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
            f"1.2.826.0.1.3680043.10.{number}"
        )
        ds.InstanceNumber = number
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"{number}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    result = runner.invoke(app, ["process", str(folder), "-p", "median", "-o", str(out)])
    assert result.exit_code == 0, result.output
    derived = derived_of(out)
    assert [d.SourceImageSequence[0].ReferencedSOPInstanceUID for _, d in derived] == [
        f"1.2.826.0.1.3680043.10.{n}" for n in (1, 2, 3)
    ]
    assert {d.SOPClassUID for _, d in derived} == {US_IMAGE}
