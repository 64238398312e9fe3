"""Processors on 2-D images, stacks of frames and colour: generated phantoms with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from proc_testing import dice
from scipy import ndimage
from skimage.color import rgb2lab

from processors.api import run_on_backend, run_processor
from processors.backend import resolve
from processors.base import (
    EVERY_GREY_IMAGE,
    ImageResult,
    LabelResult,
    MeasurementResult,
    ProcessorError,
    Units,
    Volume,
)
from processors.cluster import rgb_to_lab
from processors.registry import discover, get_processor


def disks(frames: int = 1, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy frames with a bright disk each (at a different place per frame), and the truth."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    truth = np.stack(
        [(y - 30 - 12 * f) ** 2 + (x - 40 - 10 * f) ** 2 <= 18**2 for f in range(frames)]
    )
    image = np.where(truth, 200.0, 50.0) + rng.normal(0, 15, truth.shape)
    return image.astype(np.float32), truth


def planar(array: np.ndarray, spacing: float | None = 0.2) -> Volume:
    known = spacing is not None
    step = spacing or 1.0
    return Volume(array, spacing=(1.0, step, step), modality="CR", planar=True, spacing_known=known)


def test_otsu_finds_the_disk_of_a_radiograph_and_reports_its_area_in_mm2() -> None:
    image, truth = disks()
    results = run_processor("threshold_segment", planar(image), preset="otsu", opening_iterations=1)
    labels = next(r for r in results if isinstance(r, LabelResult))
    assert dice(labels.labels > 0, truth) > 0.97
    stats = next(r for r in results if isinstance(r, MeasurementResult))
    area = stats.value("Area", 1)
    assert area == pytest.approx(int((labels.labels > 0).sum()) * 0.04)
    assert area == pytest.approx(truth.sum() * 0.04, rel=0.05)
    assert all(m.unit == Units.MM2 for m in stats.measurements if m.concept.meaning == "Area")


def test_without_pixel_spacing_areas_are_in_pixels() -> None:
    image, truth = disks()
    results = run_processor("threshold_segment", planar(image, None), preset="otsu")
    stats = next(r for r in results if isinstance(r, MeasurementResult))
    area = next(m for m in stats.measurements if m.concept.meaning == "Area")
    assert area.unit == Units.PIXELS and area.value == pytest.approx(truth.sum(), rel=0.05)


def test_components_of_a_cine_loop_stay_within_their_frames() -> None:
    image, truth = disks(frames=3)
    results = run_processor(
        "threshold_segment",
        planar(image),
        preset="otsu",
        separate_components=True,
        opening_iterations=1,
    )
    labels = next(r for r in results if isinstance(r, LabelResult))
    # The disks overlap from frame to frame: as a volume they would be one component.
    assert len(labels.segments) == 3
    for f in range(3):
        assert dice(labels.labels[f] > 0, truth[f]) > 0.95


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("gaussian", {"sigma_mm": 0.4}, lambda a: ndimage.gaussian_filter(a, 2.0)),
        ("mean", {"size": 3}, lambda a: ndimage.uniform_filter(a, 3)),
        ("median", {"size": 3}, lambda a: ndimage.median_filter(a, 3)),
    ],
)
def test_filters_act_within_each_frame_as_their_2d_meaning(name, params, reference) -> None:  # type: ignore[no-untyped-def]
    image, _ = disks(frames=2)
    out = run_processor(name, planar(image), **params)[0]
    assert isinstance(out, ImageResult)
    for f in range(2):
        assert np.allclose(out.volume.array[f], reference(image[f]), atol=1e-3)


def test_nlm_bilateral_clahe_histeq_run_frame_by_frame() -> None:
    from skimage.exposure import equalize_adapthist
    from skimage.restoration import denoise_nl_means

    image, _ = disks(frames=2, size=48)
    nlm = run_processor("nlm", planar(image), sigma=15.0, h=12.0)[0]
    assert isinstance(nlm, ImageResult)
    expected = denoise_nl_means(
        image[1], patch_size=5, patch_distance=3, h=12.0, sigma=15.0, fast_mode=True
    )
    assert np.allclose(nlm.volume.array[1], expected, atol=1e-3)
    clahe = run_processor("clahe", planar(image))[0]
    assert isinstance(clahe, ImageResult)
    unit = (image[0] - image[0].min()) / (image[0].max() - image[0].min())
    assert np.allclose(clahe.volume.array[0], equalize_adapthist(unit), atol=2e-3)
    bilateral = run_processor("bilateral", planar(image))[0]
    assert isinstance(bilateral, ImageResult) and bilateral.volume.planar


def test_window_takes_the_header_window() -> None:
    image, _ = disks()
    volume = Volume(image, planar=True, window=(125.0, 150.0))
    out = run_processor("window", volume, preset="header")[0]
    assert isinstance(out, ImageResult)
    assert np.allclose(out.volume.array, np.clip((image - 50.0) / 150.0, 0, 1), atol=1e-6)
    with pytest.raises(ProcessorError, match="no window"):
        run_processor("window", planar(image), preset="header")


def colour_phantom() -> tuple[np.ndarray, np.ndarray]:
    """Red, green and blue disks on grey, with noise; and the truth labels 0..3."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:80, :80]
    truth = np.zeros((80, 80), dtype=np.uint8)
    rgb = np.full((80, 80, 3), 0.5, dtype=np.float32)
    for label, (cy, cx, colour) in enumerate(
        [(20, 20, (0.9, 0.1, 0.1)), (20, 60, (0.1, 0.8, 0.1)), (60, 40, (0.1, 0.1, 0.9))], start=1
    ):
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= 12**2
        truth[inside] = label
        rgb[inside] = colour
    rgb = np.clip(rgb + rng.normal(0, 0.03, rgb.shape), 0, 1).astype(np.float32)
    return rgb[None], truth[None]


def test_rgb_to_lab_matches_scikit_image() -> None:
    rgb, _ = colour_phantom()
    assert np.allclose(rgb_to_lab(np, rgb), rgb2lab(rgb[0])[None], atol=1e-3)


def test_kmeans_on_colour_finds_the_colours_in_cielab() -> None:
    rgb, truth = colour_phantom()
    results = run_processor("kmeans", planar(rgb), k=4, inside_body=False)
    labels = next(r for r in results if isinstance(r, LabelResult)).labels
    # Each true region is one class (classes are ranked by lightness, not by our numbers).
    for label in range(4):
        found = np.bincount(labels[truth == label].ravel()).argmax()
        assert dice(labels == found, truth == label) > 0.98


def test_a_colour_image_filtered_stays_colour() -> None:
    rgb, _ = colour_phantom()
    out = run_processor("gaussian", planar(rgb), sigma_mm=0.2)[0]
    assert isinstance(out, ImageResult) and out.volume.colour
    expected = ndimage.gaussian_filter(rgb[0], (1.0, 1.0, 0.0))
    assert np.allclose(out.volume.array[0], expected, atol=1e-5)


def test_a_greyscale_processor_is_given_a_colour_image_s_luminance() -> None:
    rgb, _ = colour_phantom()
    out = run_processor("histeq", planar(rgb))[0]
    assert isinstance(out, ImageResult) and not out.volume.colour
    assert out.volume.shape == (1, 80, 80)


def test_a_volume_only_processor_is_refused_a_2d_image_with_the_reason() -> None:
    image, _ = disks()
    infos = discover()
    unet = get_processor("unet", infos)
    with pytest.raises(ProcessorError, match="takes 3-D volumes only"):
        run_on_backend(unet, planar(image), unet.Params(), resolve("cpu"))
    assert EVERY_GREY_IMAGE.refusal("x", planar(image)) is None


def test_features_report_a_2d_region_s_area() -> None:
    image, _ = disks()
    result = run_processor("features", planar(image), region_threshold=120.0)[0]
    assert isinstance(result, MeasurementResult)
    area = result.value("Area")
    assert area == pytest.approx(int((image > 120.0).sum()) * 0.04)
