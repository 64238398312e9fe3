"""A pipeline over a whole-slide image, region by region (dicom_node.slide_process), and
`dicom-node process` on real and generated slides to a tiled SEG and an SR."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.process import Step, build_steps
from dicom_node.slide import Slide
from dicom_node.slide_process import (
    Filtered,
    SlidePixels,
    features_slide,
    filter_params,
    halo_of,
    kmeans_slide,
    regions,
    threshold_slide,
)
from dicom_node.testing_slide import Disc, disc_truth, grid_of_discs, write_disc_slide
from processors.api import run_on_backend
from processors.backend import resolve
from processors.base import ImageResult, LabelResult, MeasurementResult, Volume
from tests.dicom_node.encode.encode_checks import dciodvfy
from tests.dicom_node.test_slide import WSI

runner = CliRunner()
SPACING = 0.0005  # mm, the generated slides'
#: Discs of different sizes (no ties in component size), some across region borders.
DISCS = [
    Disc(60, 70, 25),
    Disc(128, 128, 40, stain=1),
    Disc(250, 400, 55),
    Disc(380, 120, 33, stain=1),
    Disc(400, 560, 47),
    Disc(255, 250, 12, stain=1),
]


def one(tmp_path: Path, **options: Any) -> Slide:
    path = tmp_path / "slide.dcm"
    settings: dict[str, Any] = {"rows": 480, "columns": 640, "discs": DISCS, "tile": 96}
    write_disc_slide(path, **{**settings, **options})
    return Slide(path)


def step(name: str, **params: Any) -> Step:
    return build_steps([name], params={name: params} if params else None)[0]


def whole(slide: Slide) -> Volume:
    """The slide loaded whole, as the 2-D path would hold it."""
    pixels = slide.read_region(0, 0, *slide.shape)
    return replace(slide.geometry(), array=pixels[None])


def run_whole(slide: Slide, chosen: Step) -> list[Any]:
    return run_on_backend(chosen.processor, whole(slide), chosen.params, resolve("cpu"))


def assemble(source: Filtered, size: int) -> np.ndarray:
    out = np.zeros((source.rows, source.columns, *((3,) if source.colour else ())), np.float32)
    for top, left, height, width in regions(source.rows, source.columns, size):
        out[top : top + height, left : left + width] = source.region(top, left, height, width)
    return out


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("gaussian", {"sigma_mm": 0.002}),  # 4 pixels, a reach of 16
        ("median", {"size": 5}),
        ("mean", {"size": 7}),
        ("bilateral", {"sigma_spatial_mm": 0.001, "sigma_range": 0.1}),
        ("clahe", {"kernel_size": 32}),  # divides the region: the same contextual grid
        ("nlm", {"patch_size": 3, "patch_distance": 2, "sigma": 0.02}),
    ],
)
def test_a_filter_tile_by_tile_is_the_filter_on_the_whole_slide(
    tmp_path: Path, name: str, params: dict[str, Any]
) -> None:
    chosen = step(name, **params)
    with one(tmp_path) as slide:
        geometry = slide.geometry()
        pixels = SlidePixels(slide)
        halo = halo_of(name, chosen.params, (SPACING, SPACING))
        assert halo is not None
        here = filter_params(chosen, pixels, geometry)
        tiled = assemble(Filtered(pixels, chosen, here, halo, geometry, resolve("cpu")), 128)
        # The whole slide with the parameters fixed for the slide (CLAHE's value range).
        fixed = replace(chosen, params=here)
        (reference,) = [r for r in run_whole(slide, fixed) if isinstance(r, ImageResult)]
    np.testing.assert_allclose(tiled, reference.volume.array[0], atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {"preset": "otsu"},
        {"preset": "otsu", "separate_components": True, "connectivity": 2},
        {"preset": "otsu", "separate_components": True, "opening_iterations": 1},
        {"preset": "custom", "upper": 0.7, "keep_largest": 3, "separate_components": True},
    ],
)
def test_threshold_tile_by_tile_is_threshold_on_the_whole_slide(
    tmp_path: Path, params: dict[str, Any]
) -> None:
    chosen = step("threshold_segment", **params)
    with one(tmp_path) as slide:
        tiled = threshold_slide(SlidePixels(slide), chosen.params, slide.geometry(), 128)
        reference = run_whole(slide, chosen)
    labels, report = tiled
    expected, expected_report = reference
    assert isinstance(labels, LabelResult) and isinstance(expected, LabelResult)
    assert isinstance(report, MeasurementResult)
    assert isinstance(expected_report, MeasurementResult)
    np.testing.assert_array_equal(labels.labels, expected.labels)
    assert [s.name for s in labels.segments] == [s.name for s in expected.segments]
    assert len(report.measurements) == len(expected_report.measurements) > 0
    for got, want in zip(report.measurements, expected_report.measurements, strict=True):
        assert (got.concept, got.unit, got.segment) == (want.concept, want.unit, want.segment)
        assert got.value == pytest.approx(want.value, rel=1e-6, abs=1e-9)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_tissue_and_disc_areas_match_the_truth_across_region_borders(tmp_path: Path) -> None:
    discs = grid_of_discs(1024, 1280, 300, 100)
    path = tmp_path / "grid.dcm"
    write_disc_slide(path, rows=1024, columns=1280, discs=discs, tile=128, sparse=True)
    chosen = step("threshold_segment", preset="body", separate_components=True, min_size_voxels=50)
    with Slide(path) as slide:
        labels, report = threshold_slide(SlidePixels(slide), chosen.params, slide.geometry(), 256)
    assert isinstance(labels, LabelResult) and isinstance(report, MeasurementResult)
    truth = disc_truth(discs, 0, 0, 1024, 1280) > 0
    assert dice(labels.labels[0] > 0, truth) > 0.99
    assert len(labels.segments) == len(discs)  # each disc one component, across borders
    areas = sorted(m.value for m in report.measurements if m.concept.meaning == "Area")
    expected = sorted(d.pixels * SPACING**2 for d in discs)
    assert {m.unit.value for m in report.measurements if m.concept.meaning == "Area"} == {"mm2"}
    np.testing.assert_allclose(areas, expected, rtol=0.01)


@pytest.mark.parametrize("colour", [True, False])
def test_kmeans_classes_mean_the_same_everywhere_on_the_slide(tmp_path: Path, colour: bool) -> None:
    chosen = step("kmeans", k=3, inside_body=False)
    with one(tmp_path, colour=colour) as slide:
        labels, report = kmeans_slide(SlidePixels(slide), chosen.params, slide.geometry(), 128)
    assert isinstance(labels, LabelResult) and isinstance(report, MeasurementResult)
    truth = disc_truth(DISCS, 0, 0, 480, 640)
    # Ranked by lightness (colour: L*, the darker stain first) or intensity (grey: glass
    # darkest, the second stain brightest).
    order = {0: 3, 1: 2, 2: 1} if colour else {0: 1, 1: 2, 2: 3}
    for stain, label in order.items():
        assert dice(labels.labels[0] == label, truth == stain) > 0.98, (stain, label)
    assert [s.label for s in labels.segments] == [1, 2, 3]


def test_features_of_a_slide_are_the_whole_slide_statistics(tmp_path: Path) -> None:
    chosen = step("features", region_threshold=None, sift=False, haar=False, glcm_range=None)
    with one(tmp_path) as slide:
        (tiled,) = features_slide(SlidePixels(slide), chosen.params, slide.geometry(), 128)
        (reference,) = run_whole(slide, chosen)
    assert isinstance(tiled, MeasurementResult) and isinstance(reference, MeasurementResult)
    for name in ("Mean", "Standard Deviation", "Minimum", "Maximum", "Skewness", "Kurtosis"):
        assert tiled.value(name) == pytest.approx(reference.value(name), rel=1e-6), name
    assert tiled.value("Area") == pytest.approx(480 * 640 * SPACING**2)
    assert reference.value("Area") == pytest.approx(tiled.value("Area"))
    bin_width = (reference.value("Maximum") - reference.value("Minimum")) / 64
    assert abs(tiled.value("Median") - reference.value("Median")) <= bin_width


def test_on_a_noisy_slide_a_gaussian_first_brings_the_discs_back(tmp_path: Path) -> None:
    discs = grid_of_discs(1024, 1024, 400, 120)
    path = tmp_path / "noisy.dcm"
    write_disc_slide(path, rows=1024, columns=1024, discs=discs, tile=256, noise=40.0)
    truth = disc_truth(discs, 0, 0, 1024, 1024)
    smooth = step("gaussian", sigma_mm=0.001)
    segment = step("threshold_segment", preset="body", separate_components=True, min_size_voxels=50)
    cluster = step("kmeans", k=3, inside_body=False)
    with Slide(path) as slide:
        geometry, raw = slide.geometry(), SlidePixels(slide)
        halo = halo_of("gaussian", smooth.params, (SPACING, SPACING))
        assert halo is not None
        smoothed = Filtered(raw, smooth, smooth.params, halo, geometry, resolve("cpu"))
        noisy, _ = threshold_slide(raw, segment.params, geometry, 256)
        labels, report = threshold_slide(smoothed, segment.params, geometry, 256)
        classes, _ = kmeans_slide(smoothed, cluster.params, geometry, 256)
    assert isinstance(noisy, LabelResult) and isinstance(labels, LabelResult)
    assert isinstance(report, MeasurementResult) and isinstance(classes, LabelResult)
    assert dice(noisy.labels[0] > 0, truth > 0) < 0.97  # the noise breaks the discs up
    assert dice(labels.labels[0] > 0, truth > 0) > 0.99
    areas = sorted(m.value for m in report.measurements if m.concept.meaning == "Area")
    np.testing.assert_allclose(areas, sorted(d.pixels * SPACING**2 for d in discs), rtol=0.02)
    for stain, label in {0: 3, 1: 2, 2: 1}.items():
        assert dice(classes.labels[0] == label, truth == stain) > 0.98, (stain, label)


# ------------------------------------------------------------------ dicom-node process


def errors(path: Path) -> set[str]:
    return {line for line in dciodvfy(path) if line.startswith("Error")}


def process(
    tmp_path: Path, sources: list[Path], pipeline: str, *extra: str
) -> tuple[int, str, Path]:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for source in sources:
        shutil.copy(source, folder / source.name)
    out = tmp_path / "out"
    result = runner.invoke(app, ["process", str(folder), "-p", pipeline, "-o", str(out), *extra])
    return result.exit_code, result.output, out


def written(out: Path) -> dict[str, pydicom.Dataset]:
    return {str(p.relative_to(out)): pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))}


PIPELINE = (
    "median",
    "threshold_segment",
    "kmeans",
    "features",
)
PARAMS = (
    "--param",
    'threshold_segment.preset="otsu"',
    "--param",
    "kmeans.inside_body=false",
    "--param",
    "features.region_threshold=null",
)


@pytest.mark.parametrize(
    "name", ["sm_image.dcm", "sm_image_grayscale.dcm", "sm_image_jpegls.dcm", "sm_image_dots.dcm"]
)
def test_a_real_slide_goes_through_to_a_tiled_seg_and_an_sr(tmp_path: Path, name: str) -> None:
    source = WSI / name
    code, output, out = process(tmp_path, [source], ",".join(PIPELINE), *PARAMS)
    assert code == 0, output
    files = written(out)
    kinds = sorted(path.split("/")[-3] + "/" + path.split("/")[-2] for path in files)
    assert kinds == [
        "01-median/derived-0",
        "02-threshold_segment/seg-0",
        "02-threshold_segment/sr-0",
        "03-kmeans/seg-0",
        "03-kmeans/sr-0",
        "04-features/sr-0",
    ]
    src = pydicom.dcmread(source, stop_before_pixels=True)
    for path, ds in files.items():
        if "/derived-" in path:
            assert ds.SOPClassUID == src.SOPClassUID and list(ds.ImageType)[:2] == [
                "DERIVED",
                "PRIMARY",
            ]
            assert ds.PhotometricInterpretation == (
                "RGB" if src.SamplesPerPixel == 3 else "MONOCHROME2"
            )
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        if "/seg-" in path:
            assert (ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns) == (50, 50)
            assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns)  # tiled as the source
            reference = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            assert reference.ReferencedSOPInstanceUID == src.SOPInstanceUID
        new = errors(out / path) - errors(source)
        assert not new, (path, new)


def test_a_generated_sparse_slide_gets_a_seg_and_areas_in_mm2(tmp_path: Path) -> None:
    path = tmp_path / "phantom.dcm"
    write_disc_slide(path, rows=480, columns=640, discs=DISCS, tile=96, sparse=True)
    code, output, out = process(
        tmp_path,
        [path],
        "gaussian,threshold_segment,kmeans,features",
        "--param",
        "gaussian.sigma_mm=0.0005",
        "--param",
        "threshold_segment.separate_components=true",
        "--param",
        "threshold_segment.min_size_voxels=50",
        "--param",
        "kmeans.inside_body=false",
        "--param",
        "features.region_threshold=null",
    )
    assert code == 0, output
    files = written(out)
    assert sorted({p.split("/")[-3] for p in files}) == [
        "01-gaussian",
        "02-threshold_segment",
        "03-kmeans",
        "04-features",
    ]
    seg = next(ds for p, ds in files.items() if "/02-threshold_segment/seg-" in p)
    assert len(seg.SegmentSequence) == len(DISCS)
    classes = next(ds for p, ds in files.items() if "/03-kmeans/seg-" in p)
    assert len(classes.SegmentSequence) == 3
    report = next(ds for p, ds in files.items() if "/02-threshold_segment/sr-" in p)
    areas = sorted(
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in content_items(report)
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == "Area"
    )
    # Within a ring of one pixel around each disc (the blur moves its edge, not its area).
    for area, disc in zip(areas, sorted(DISCS, key=lambda d: d.radius), strict=True):
        assert abs(area - disc.pixels * SPACING**2) <= 2 * np.pi * disc.radius * SPACING**2
    for p in files:
        assert not errors(out / p) - errors(path), p


def content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items += [item, *content_items(item)]
    return items


def test_only_the_highest_resolution_level_of_a_pyramid_is_processed(tmp_path: Path) -> None:
    levels = []
    for rows, kind in ((480, "VOLUME"), (240, "VOLUME"), (120, "LABEL")):
        path = tmp_path / f"{kind}-{rows}.dcm"
        discs = [
            Disc(d.row * rows / 480, d.column * rows / 480, d.radius * rows / 480) for d in DISCS
        ]
        write_disc_slide(
            path, rows=rows, columns=rows * 4 // 3, discs=discs, tile=96, image_type=kind
        )
        levels.append(path)
    code, output, out = process(tmp_path, levels, "threshold_segment")
    assert code == 0, output
    assert "1 LABEL image(s) of the slide ignored" in output
    assert "1 lower-resolution pyramid level(s) ignored: the 480x640 level" in output
    seg = next(ds for p, ds in written(out).items() if "/seg-" in p)
    assert seg.TotalPixelMatrixRows == 480


@pytest.mark.parametrize("colour", [True, False])
def test_a_filter_writes_a_derived_slide_of_its_output(tmp_path: Path, colour: bool) -> None:
    path = tmp_path / "phantom.dcm"
    write_disc_slide(path, rows=300, columns=420, discs=DISCS, tile=128, colour=colour)
    code, output, out = process(tmp_path, [path], "gaussian", "--param", "gaussian.sigma_mm=0.001")
    assert code == 0, output
    (derived,) = out.rglob("derived-0/0001.dcm")
    with Slide(path) as source, Slide(derived) as result:
        assert result.shape == source.shape and result.colour == colour
        assert result.header.DimensionOrganizationType == "TILED_FULL"
        (expected,) = run_whole(source, step("gaussian", sigma_mm=0.001))
        assert isinstance(expected, ImageResult)
        values = result.read_region(0, 0, 300, 420)
    # 8-bit RGB in [0, 1], or 16-bit grey in the source's units: to within a stored step.
    np.testing.assert_allclose(values, expected.volume.array[0], atol=0.5 / 255 if colour else 0.5)
    assert not errors(derived) - errors(path)


@pytest.mark.parametrize(
    ("pipeline", "extra", "why"),
    [
        ("histeq", (), "histeq has no tiled form for a whole-slide image"),
        ("gaussian", (), "gaussian reaches 8016 pixels"),  # sigma 1 mm at 0.000499 mm
        ("threshold_segment", ("--param", 'threshold_segment.preset="bone"'), "a CT range"),
        ("kmeans", ("--param", "kmeans.spatial_weight=1"), "spatial_weight is not supported"),
    ],
)
def test_a_step_without_a_tiled_form_is_refused_before_any_work(
    tmp_path: Path, pipeline: str, extra: tuple[str, ...], why: str
) -> None:
    code, output, out = process(tmp_path, [WSI / "sm_image.dcm"], pipeline, *extra)
    assert code == 2
    assert why in " ".join(output.split())
    assert not list(out.rglob("*.dcm"))


def test_a_job_processes_an_encrypted_slide_to_encrypted_outputs(tmp_path: Path) -> None:
    """What the node runs on a worker: the spooled slide read through the key ring, the
    derived slide, SEG and SR written encrypted, a step's outputs reported in step order."""
    from dicom_node.jobs.worker import JobSpec, run_job
    from dicom_node.security.crypto import MAGIC, read_dicom, write_data_file
    from dicom_node.security.keys import KeyRing, write_key_file

    keys = KeyRing.generate()
    write_key_file(tmp_path / "key", keys.keys)
    plain, sealed = tmp_path / "plain.dcm", tmp_path / "sealed.dcm"
    write_disc_slide(plain, rows=300, columns=400, discs=DISCS[:2], tile=128)
    write_data_file(sealed, plain.read_bytes(), keys)
    spec = JobSpec(
        1,
        "series",
        (str(sealed),),
        ("median", "threshold_segment"),
        {"threshold_segment": {"preset": "otsu"}},
        str(tmp_path / "out"),
    )
    records = run_job(replace(spec, key_file=tmp_path / "key")).records
    assert [record.kind for record in records] == ["derived", "seg", "sr"]
    for record in records:
        assert record.path.read_bytes().startswith(MAGIC)
        assert read_dicom(record.path, keys).SOPInstanceUID == record.sop_instance_uid
    with Slide(records[0].path, keys) as derived:
        assert derived.shape == (300, 400) and derived.colour
