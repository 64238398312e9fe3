"""Denoisers against scipy.ndimage and scikit-image, on NumPy and (marker gpu) CuPy."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import scipy.ndimage as ndi
from proc_testing import SPACING, to_numpy
from skimage.restoration import denoise_bilateral, denoise_nl_means

from processors.api import run_processor
from processors.base import ImageResult
from processors.denoise import bilateral_xp, nl_means


def _image(results: list) -> np.ndarray:
    assert len(results) == 1 and isinstance(results[0], ImageResult)
    return to_numpy(results[0].volume.array)


@pytest.mark.parametrize("size", [3, 5])
def test_mean_matches_scipy(phantom, device, size):
    out = _image(run_processor("mean", phantom.values, SPACING, device, size=size))
    np.testing.assert_allclose(out, ndi.uniform_filter(phantom.values, size), atol=1e-3)


@pytest.mark.parametrize("size", [3, 5])
def test_median_matches_scipy(phantom, device, size):
    out = _image(run_processor("median", phantom.values, SPACING, device, size=size))
    np.testing.assert_allclose(out, ndi.median_filter(phantom.values, size), atol=1e-4)


@pytest.mark.parametrize("sigma_mm", [1.0, 3.0])
def test_gaussian_matches_scipy_with_sigma_in_mm(phantom, device, sigma_mm):
    out = _image(run_processor("gaussian", phantom.values, SPACING, device, sigma_mm=sigma_mm))
    sigma = tuple(sigma_mm / s for s in SPACING)
    np.testing.assert_allclose(out, ndi.gaussian_filter(phantom.values, sigma), atol=1e-2)


def test_gaussian_reduces_noise(phantom):
    out = _image(run_processor("gaussian", phantom.values, SPACING, sigma_mm=2.0))
    soft = phantom.labels["body"] & ~phantom.labels["lung"] & ~phantom.labels["bone"]
    soft &= ~phantom.labels["lesion"]
    soft = ndi.binary_erosion(soft, iterations=5)
    assert out[soft].std() < 0.5 * phantom.values[soft].std()


NLM_CASES = [(5, 2, 14.0, 12.0), (3, 3, 10.0, 0.0)]


@pytest.mark.parametrize(("patch", "distance", "h", "sigma"), NLM_CASES)
def test_nlm_matches_skimage(device, patch, distance, h, sigma):
    image = np.ascontiguousarray(
        make_small_volume(seed=patch + distance)[:, :40, :36], dtype=np.float32
    )
    expected = denoise_nl_means(
        image, patch_size=patch, patch_distance=distance, h=h, sigma=sigma, fast_mode=True
    )
    out = _image(
        run_processor(
            "nlm",
            image,
            SPACING,
            device,
            patch_size=patch,
            patch_distance=distance,
            h=h,
            sigma=sigma,
        )
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("patch", "distance", "h", "sigma"), NLM_CASES)
def test_nlm_array_implementation_matches_skimage_on_numpy(patch, distance, h, sigma):
    # The algorithm the GPU runs, executed with NumPy, against scikit-image's Cython.
    image = make_small_volume(seed=11)[:10, :30, :28].astype(np.float64)
    expected = denoise_nl_means(
        image, patch_size=patch, patch_distance=distance, h=h, sigma=sigma, fast_mode=True
    )
    out = nl_means(np, image, patch, distance, h, sigma)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(out - image).max() > 1.0  # it did smooth


def test_nlm_default_h_from_estimated_noise(phantom):
    out = _image(run_processor("nlm", phantom.values[:12], SPACING, patch_distance=2))
    soft = phantom.labels["body"][:12] & ~phantom.labels["lung"][:12]
    soft &= ~phantom.labels["bone"][:12] & ~phantom.labels["lesion"][:12]
    soft = ndi.binary_erosion(soft, iterations=3)
    assert out[soft].std() < 0.6 * phantom.values[:12][soft].std()


def make_small_volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices((12, 40, 36), dtype=np.float32)
    ball = (zz - 6) ** 2 + (yy - 20) ** 2 + (xx - 18) ** 2 < 64
    image = np.where(ball, 100.0, 20.0) + 0.5 * xx
    return (image + rng.normal(0, 10, size=image.shape)).astype(np.float32)


def test_bilateral_range_kernel_matches_skimage():
    # skimage's bilateral is 2-D; with a flat spatial kernel its window, boundary handling
    # and range weights can be compared exactly (its spatial lookup table is misaligned for
    # win_size > 5, see docs/plugins.md).
    image = make_small_volume(seed=1)[:3].astype(np.float64)
    image -= image.min()  # skimage's colour table assumes a non-negative image
    sigma_range = 15.0
    expected = np.stack(
        [
            denoise_bilateral(
                s,
                win_size=5,
                sigma_color=sigma_range,
                sigma_spatial=1e4,
                bins=1_000_000,
                mode="symmetric",
            )
            for s in image
        ]
    )
    out = bilateral_xp(np, image, (0, 2, 2), (1.0, 1e4, 1e4), sigma_range)
    np.testing.assert_allclose(out, expected, atol=5e-3)


def brute_force_bilateral(image, radii, sigmas, sigma_range):
    padded = np.pad(image, [(r, r) for r in radii], mode="symmetric")
    out = np.empty_like(image, dtype=np.float64)
    for z, y, x in np.ndindex(image.shape):
        window = padded[
            z : z + 2 * radii[0] + 1, y : y + 2 * radii[1] + 1, x : x + 2 * radii[2] + 1
        ]
        offsets = np.indices(window.shape) - np.array(radii)[:, None, None, None]
        spatial = np.exp(-sum(offsets[i] ** 2 / (2 * sigmas[i] ** 2) for i in range(3)))
        rng = np.exp(-((window - image[z, y, x]) ** 2) / (2 * sigma_range**2))
        weights = spatial * rng
        out[z, y, x] = (weights * window).sum() / weights.sum()
    return out


@pytest.mark.parametrize("in_plane", [False, True])
def test_bilateral_processor_matches_brute_force(device, in_plane):
    image = make_small_volume(seed=2)[:6, :14, :12]
    spacing = (2.0, 1.0, 1.0)
    out = _image(
        run_processor(
            "bilateral",
            image,
            spacing,
            device,
            sigma_spatial_mm=1.0,
            sigma_range=30.0,
            in_plane=in_plane,
        )
    )
    sigmas = (1.0 / 2.0, 1.0, 1.0) if not in_plane else (1.0, 1.0, 1.0)
    radii = (0 if in_plane else 2, 3, 3)
    expected = brute_force_bilateral(image.astype(np.float64), radii, sigmas, 30.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


def test_bilateral_preserves_edges_better_than_gaussian():
    image = make_small_volume(seed=4)
    bil = _image(
        run_processor("bilateral", image, (1, 1, 1), sigma_spatial_mm=1.5, sigma_range=25.0)
    )
    gauss = _image(run_processor("gaussian", image, (1, 1, 1), sigma_mm=1.5))
    # Across the ball's boundary (x = 10 -> 11 at z = 6, y = 20) the bilateral filter keeps
    # more of the 80-unit step than a Gaussian of the same spatial sigma.
    bil_step = float(bil[6, 20, 12] - bil[6, 20, 9])
    gauss_step = float(gauss[6, 20, 12] - gauss[6, 20, 9])
    assert bil_step > gauss_step + 10.0


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("mean", {"size": 4}, "size"),
        ("median", {"size": 0}, "size"),
        ("gaussian", {"sigma_mm": -1}, "sigma_mm"),
        ("nlm", {"patch_size": 4}, "patch_size"),
        ("nlm", {"h": 0}, "h"),
        ("bilateral", {"sigma_range": 0}, "sigma_range"),
        ("mean", {"sise": 3}, "sise"),
    ],
)
def test_bad_params_name_the_field(name, params, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        run_processor(name, np.zeros((3, 4, 4), np.float32), **params)
