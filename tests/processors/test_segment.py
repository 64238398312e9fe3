"""threshold_segment against scipy.ndimage / skimage, and against phantom truth."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import scipy.ndimage as ndi
from proc_testing import SPACING, dice, to_numpy
from skimage.filters import threshold_otsu

from processors.api import run_pipeline, run_processor
from processors.base import Codes, LabelResult, MeasurementResult, Volume
from processors.segment import HU_PRESETS
from processors.segment import threshold_otsu as our_otsu


def _labels(results: list) -> tuple[np.ndarray, LabelResult]:
    label = next(r for r in results if isinstance(r, LabelResult))
    return to_numpy(label.labels), label


def reference_segment(image, lower, upper, opening, closing, fill, keep, min_size, conn):
    mask = np.ones(image.shape, bool)
    if lower is not None:
        mask &= image >= lower
    if upper is not None:
        mask &= image <= upper
    structure = ndi.generate_binary_structure(3, 1)
    if opening:
        mask = ndi.binary_opening(mask, structure, iterations=opening)
    if closing:
        mask = ndi.binary_closing(mask, structure, iterations=closing)
    if fill:
        mask = ndi.binary_fill_holes(mask, structure)
    labels, count = ndi.label(mask, ndi.generate_binary_structure(3, conn))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    order = sorted(range(1, count + 1), key=lambda i: (-sizes[i], i))
    kept = [i for i in order if sizes[i] >= max(min_size, 1)]
    if keep is not None:
        kept = kept[:keep]
    return np.isin(labels, kept)


@pytest.mark.parametrize(
    "params",
    [
        dict(preset="body", keep_largest=1, fill_holes=True),
        dict(preset="bone", opening_iterations=1, min_size_voxels=20),
        dict(preset="lung", closing_iterations=1, keep_largest=2, connectivity=3),
        dict(preset="air"),
        dict(preset="custom", lower=60.0, upper=150.0, opening_iterations=1, keep_largest=1),
    ],
)
def test_threshold_segment_matches_scipy(phantom, device, params):
    out, result = _labels(
        run_processor("threshold_segment", phantom.values, SPACING, device, **params)
    )
    preset = HU_PRESETS.get(params["preset"])
    lower = params.get("lower") if preset is None else preset.lower
    upper = params.get("upper") if preset is None else preset.upper
    expected = reference_segment(
        phantom.values,
        None if lower == -np.inf else lower,
        None if upper == np.inf else upper,
        params.get("opening_iterations", 0),
        params.get("closing_iterations", 0),
        params.get("fill_holes", False),
        params.get("keep_largest"),
        params.get("min_size_voxels", 0),
        params.get("connectivity", 1),
    )
    assert expected.any()
    assert dice(out > 0, expected) >= 0.99
    assert set(np.unique(out)) <= {0, 1}
    assert [s.label for s in result.segments] == [1]


def test_presets_find_phantom_anatomy(phantom):
    body, _ = _labels(
        run_processor(
            "threshold_segment",
            phantom.values,
            SPACING,
            preset="body",
            keep_largest=1,
            fill_holes=True,
        )
    )
    assert dice(body, phantom.labels["body"]) >= 0.95
    bone, result = _labels(
        run_processor("threshold_segment", phantom.values, SPACING, preset="bone", keep_largest=1)
    )
    assert dice(bone, phantom.labels["bone"]) >= 0.95
    assert result.segments[0].type == Codes.BONE
    lung, result = _labels(
        run_processor(
            "threshold_segment",
            phantom.values,
            SPACING,
            preset="lung",
            opening_iterations=1,
            keep_largest=2,
            separate_components=True,
        )
    )
    assert dice(lung > 0, phantom.labels["lung"]) >= 0.95
    assert [s.label for s in result.segments] == [1, 2]
    assert result.segments[0].type == Codes.LUNG


def test_otsu_threshold_matches_skimage(phantom, xp):
    image = xp.asarray(phantom.values)
    assert our_otsu(xp, image, 256) == pytest.approx(threshold_otsu(phantom.values, 256), abs=1e-3)


def test_noisy_sphere_denoise_then_segment_dice(noisy_sphere, device):
    image, truth = noisy_sphere
    results = run_pipeline(
        [
            ("median", {"size": 5}),
            ("threshold_segment", {"preset": "otsu", "keep_largest": 1, "fill_holes": True}),
        ],
        Volume(image, spacing=(1.0, 1.0, 1.0)),
        device,
    )
    labels, _ = _labels(results)
    assert dice(labels, truth) >= 0.95
    # Without denoising the same segmentation is much worse: the test can fail.
    raw, _ = _labels(run_processor("threshold_segment", image, preset="otsu", keep_largest=1))
    assert dice(raw, truth) < 0.9


def test_separate_components_ordered_by_size(device):
    image = np.zeros((10, 30, 30), np.float32)
    image[2:5, 2:5, 2:5] = 1  # 27 voxels
    image[2:8, 10:18, 10:18] = 1  # 384 voxels
    image[7:9, 25:27, 25:27] = 1  # 8 voxels
    out, result = _labels(
        run_processor(
            "threshold_segment",
            image,
            (1, 1, 1),
            device,
            preset="custom",
            lower=0.5,
            separate_components=True,
            min_size_voxels=10,
        )
    )
    assert [s.label for s in result.segments] == [1, 2]
    assert (out == 1).sum() == 384 and (out == 2).sum() == 27
    assert out[7, 25, 25] == 0


def test_statistics_measurements(phantom):
    results = run_processor(
        "threshold_segment", phantom.values, SPACING, preset="bone", keep_largest=1
    )
    labels, _ = _labels(results)
    stats = next(r for r in results if isinstance(r, MeasurementResult))
    voxels = int((labels == 1).sum())
    assert stats.value("Volume", 1) == pytest.approx(voxels * 2.5 * 2.0 * 2.0)
    assert stats.value("Mean", 1) == pytest.approx(phantom.values[labels == 1].mean(), rel=1e-5)
    assert stats.value("Maximum", 1) == pytest.approx(phantom.values[labels == 1].max())


def test_custom_preset_needs_bounds():
    with pytest.raises(pydantic.ValidationError, match="custom"):
        run_processor("threshold_segment", np.zeros((2, 2, 2), np.float32), preset="custom")
    with pytest.raises(pydantic.ValidationError, match="keep_largest"):
        run_processor("threshold_segment", np.zeros((2, 2, 2), np.float32), keep_largest=0)
