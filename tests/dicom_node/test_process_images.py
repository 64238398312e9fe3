"""`dicom-node process` on 2-D and colour images: SEG, SR with areas, Secondary Capture."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.image import datasets_to_image, read_image_file
from processors.api import run_processor
from processors.base import ImageResult
from tests.dicom_node.encode.encode_checks import dciodvfy
from tests.dicom_node.planar_files import DX, disc, mammogram, region, ultrasound
from tests.dicom_node.test_image import CR, data

runner = CliRunner()

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


def errors(path: Path) -> set[str]:
    return {line for line in dciodvfy(path) if line.startswith("Error")}


def run(tmp_path: Path, source: Path, pipeline: str, *extra: str) -> tuple[int, str, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    out = tmp_path / "out"
    result = runner.invoke(app, ["process", str(folder), "-p", pipeline, "-o", str(out), *extra])
    return result.exit_code, result.output, out


def written(out: Path) -> dict[str, pydicom.Dataset]:
    return {str(p.relative_to(out)): pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))}


@pytest.mark.parametrize(
    "name",
    [
        "CR",  # MONOCHROME1, ImagerPixelSpacing
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline YBR_FULL_422
        "US1_J2KR.dcm",  # JPEG 2000 YBR_RCT ultrasound
        "OBXXXX1A_rle.dcm",  # RLE palette colour ultrasound
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless greyscale ultrasound
    ],
)
def test_a_2d_image_goes_through_to_seg_sr_and_a_derived_image(tmp_path: Path, name: str) -> None:
    source = CR if name == "CR" else data(name)
    code, output, out = run(
        tmp_path, source, "median,kmeans", "--param", "kmeans.inside_body=false"
    )
    assert code == 0, output
    files = written(out)
    kinds = {path.split("/")[-2].rsplit("-", 1)[0] for path in files}
    assert kinds == {"derived", "seg", "sr"}, files
    src = pydicom.dcmread(source)
    for path, ds in files.items():
        if "/derived-" in path:
            if src.SOPClassUID == SECONDARY_CAPTURE:
                assert ds.SOPClassUID == SECONDARY_CAPTURE
                assert "Secondary Capture" in ds.DerivationDescription
            else:  # the CR and US IODs take a derived image
                assert ds.SOPClassUID == src.SOPClassUID and ds.ImageType[0] == "DERIVED"
            colour = src.PhotometricInterpretation not in ("MONOCHROME1", "MONOCHROME2")
            assert ds.PhotometricInterpretation == ("RGB" if colour else "MONOCHROME2")
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        if "/seg-" in path:
            reference = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            assert reference.ReferencedSOPInstanceUID == src.SOPInstanceUID
        new = errors(out / path) - errors(source)
        assert not new, (path, new)


def test_the_sr_of_a_radiograph_reports_areas_in_mm2(tmp_path: Path) -> None:
    code, output, out = run(
        tmp_path, CR, "threshold_segment", "--param", 'threshold_segment.preset="otsu"'
    )
    assert code == 0, output
    report = next(ds for path, ds in written(out).items() if "/sr-" in path)
    units = {
        item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        for item in content_items(report)
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == "Area"
    }
    assert units == {"mm2"}


def areas(report: pydicom.Dataset) -> list[tuple[float, str]]:
    """Every Area in the SR: (value, UCUM unit)."""
    return [
        (
            float(item.MeasuredValueSequence[0].NumericValue),
            item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for item in content_items(report)
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == "Area"
    ]


def test_an_ultrasound_disc_of_known_size_is_measured_in_mm2(tmp_path: Path) -> None:
    """Calibrated region: PhysicalDeltaX 0.01 cm, PhysicalDeltaY 0.02 cm, so a pixel is
    0.1 mm x 0.2 mm; a bright disc of radius 40 pixels."""
    shape = (200, 300)
    inside = disc(shape, (100, 150), 40)
    pixels = np.where(inside, 200, 20).astype(np.uint8)
    source = ultrasound(tmp_path / "us.dcm", pixels, [region(0.01, 0.02, (0, 0, 299, 199))])
    code, output, out = run(
        tmp_path, source, "threshold_segment", "--param", 'threshold_segment.preset="otsu"'
    )
    assert code == 0, output
    report = next(ds for path, ds in written(out).items() if "/sr-" in path)
    ((area, unit),) = areas(report)
    assert unit == "mm2"
    assert area == pytest.approx(int(inside.sum()) * 0.1 * 0.2)  # the pixels it covers
    assert area == pytest.approx(np.pi * 40**2 * 0.02, rel=0.005)  # the disc, discretised


def test_a_real_ultrasound_with_one_region_reports_areas_in_mm2(tmp_path: Path) -> None:
    code, output, out = run(
        tmp_path,
        data("JPGLosslessP14SV1_1s_1f_8b.dcm"),
        "threshold_segment",
        "--param",
        'threshold_segment.preset="otsu"',
    )
    assert code == 0, output
    report = next(ds for path, ds in written(out).items() if "/sr-" in path)
    assert {unit for _, unit in areas(report)} == {"mm2"}


def content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items += [item, *content_items(item)]
    return items


def test_a_cine_loop_gets_derived_frames_a_seg_of_every_frame_and_an_sr(tmp_path: Path) -> None:
    source = data("OBXXXX1A_rle_2frame.dcm")
    code, output, out = run(
        tmp_path, source, "gaussian,kmeans", "--param", "kmeans.inside_body=false"
    )
    assert code == 0, output
    assert "no SEG" not in output
    files = written(out)
    (derived,) = [ds for path, ds in files.items() if "/derived-" in path]
    assert derived.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1" and derived.NumberOfFrames == 2
    (seg,) = [ds for path, ds in files.items() if "/seg-" in path]
    frames = {
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    assert frames == {1, 2}
    (report,) = [ds for path, ds in files.items() if "/sr-" in path]
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in content_items(report)
        if item.get("ValueType") == "IMAGE"
    }
    assert seg.SOPInstanceUID in referenced
    for path in files:
        new = errors(out / path) - errors(source)
        assert not new, (path, new)


def test_a_volume_only_processor_is_refused_before_any_work(tmp_path: Path) -> None:
    code, output, out = run(tmp_path, CR, "gaussian,unet")
    assert code == 2
    assert "unet takes 3-D volumes only" in output
    assert not list(out.rglob("*.dcm"))


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
    assert {d.SOPClassUID for _, d in derived} == {"1.2.840.10008.5.1.4.1.1.6.1"}
