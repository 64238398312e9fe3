"""Window, histogram equalisation and CLAHE against scikit-image."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from proc_testing import SPACING, to_numpy
from skimage.exposure import equalize_adapthist, equalize_hist, rescale_intensity

from processors.api import run_processor
from processors.enhance import WINDOW_PRESETS, clahe


def _image(results: list) -> np.ndarray:
    return to_numpy(results[0].volume.array)


@pytest.mark.parametrize(("level", "width"), [(40.0, 400.0), (-600.0, 1500.0), (300, 50)])
def test_window_matches_rescale_intensity(phantom, device, level, width):
    out = _image(run_processor("window", phantom.values, SPACING, device, level=level, width=width))
    expected = rescale_intensity(
        phantom.values.astype(np.float64),
        in_range=(level - width / 2, level + width / 2),
        out_range=(0.0, 1.0),
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.dtype == np.float32


def test_window_preset_overrides_level_and_width(phantom):
    level, width = WINDOW_PRESETS["lung"]
    by_preset = _image(run_processor("window", phantom.values, preset="lung", level=0, width=1))
    by_value = _image(run_processor("window", phantom.values, level=level, width=width))
    np.testing.assert_array_equal(by_preset, by_value)


def test_window_unknown_preset_is_a_validation_error():
    with pytest.raises(pydantic.ValidationError, match="preset"):
        run_processor("window", np.zeros((2, 2, 2), np.float32), preset="kidney")


@pytest.mark.parametrize("nbins", [64, 256])
def test_histeq_matches_skimage(phantom, device, nbins):
    out = _image(run_processor("histeq", phantom.values, SPACING, device, nbins=nbins))
    np.testing.assert_allclose(out, equalize_hist(phantom.values, nbins=nbins), atol=1e-5)


@pytest.mark.parametrize(
    ("kernel_size", "clip_limit", "nbins"), [(None, 0.01, 256), (8, 0.03, 128), (6, 0.0, 64)]
)
def test_clahe_matches_skimage(phantom, device, kernel_size, clip_limit, nbins):
    volume = phantom.values[:16, :48, :40]
    out = _image(
        run_processor(
            "clahe",
            volume,
            SPACING,
            device,
            kernel_size=kernel_size,
            clip_limit=clip_limit,
            nbins=nbins,
        )
    )
    unit = rescale_intensity(volume, out_range=(0.0, 1.0)).astype(np.float32)
    kernel = None if kernel_size is None else (kernel_size,) * 3
    expected = equalize_adapthist(unit, kernel_size=kernel, clip_limit=clip_limit, nbins=nbins)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [None, (6, 8, 8)])
def test_clahe_array_implementation_matches_skimage_on_numpy(phantom, kernel_size):
    # The algorithm the GPU runs, executed with NumPy.
    unit = rescale_intensity(phantom.values, out_range=(0.0, 1.0)).astype(np.float32)
    expected = equalize_adapthist(unit, kernel_size=kernel_size, clip_limit=0.01, nbins=256)
    np.testing.assert_allclose(clahe(np, unit, kernel_size, 0.01, 256), expected, atol=1e-6)


def test_clahe_bad_clip_limit():
    with pytest.raises(pydantic.ValidationError, match="clip_limit"):
        run_processor("clahe", np.zeros((4, 4, 4), np.float32), clip_limit=2)


def test_clahe_with_a_value_range_maps_a_crop_as_it_maps_the_whole(phantom):
    """With the image's range given, a crop on the contextual grid (and a kernel's margin
    around what is kept) equalises as the whole image does: no per-crop stretching."""
    plane = phantom.values[len(phantom.values) // 2].astype(np.float32)
    value_range = (float(plane.min()), float(plane.max()))

    def equalised(image):
        (result,) = run_processor(
            "clahe", image[None], spacing=SPACING, kernel_size=8, value_range=value_range
        )
        return to_numpy(result.volume.array)[0]

    whole = equalised(plane)
    crop = equalised(plane[8:, 16:])  # starts on the 8-pixel grid
    np.testing.assert_array_equal(crop[8:-8, 8:-8], whole[16:-8, 24:-8])
    unit = rescale_intensity(plane, out_range=(0.0, 1.0)).astype(np.float32)[None]
    expected = clahe(np, unit, (8, 8, 8), 0.01, 256, stretch=False)[0]  # a 1-slice volume
    np.testing.assert_allclose(whole, expected, atol=1e-6)
    with pytest.raises(pydantic.ValidationError, match="value_range"):
        run_processor("clahe", plane[None], value_range=(1.0, 1.0))
