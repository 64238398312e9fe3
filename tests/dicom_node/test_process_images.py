"""`dicom-node process` on 2-D and colour images: SEG, SR with areas, Secondary Capture."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from tests.dicom_node.encode.encode_checks import dciodvfy
from tests.dicom_node.planar_files import disc, region, ultrasound
from tests.dicom_node.test_image import CR, data

runner = CliRunner()

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


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


def test_a_capture_without_patient_id_gets_its_seg_and_sr_with_an_empty_one(
    tmp_path: Path,
) -> None:
    """pydicom's OT-PAL-8-face.dcm has no PatientID, PatientSex, StudyID...: type 2
    attributes highdicom copies into every SEG and SR. They are written empty."""
    source = data("OT-PAL-8-face.dcm")
    assert "PatientID" not in pydicom.dcmread(source, force=True)
    code, output, out = run(tmp_path, source, "kmeans", "--param", "kmeans.inside_body=false")
    assert code == 0, output
    assert "absent from the source, empty in the outputs: PatientID" in output
    files = written(out)
    outputs = [ds for path, ds in files.items() if "/seg-" in path or "/sr-" in path]
    assert {ds.Modality for ds in outputs} == {"SEG", "SR"}
    assert all(ds.PatientID == "" and ds.StudyID == "" for ds in outputs)
