"""Radiomics-style features of a region -> MeasurementResult.

- first-order statistics of the region's voxels (mean, spread, percentiles, skewness,
  kurtosis, histogram entropy and uniformity, region volume), computed with ``xp``;
- GLCM texture (as ``skimage.feature.graycomatrix`` + ``graycoprops``, symmetric, normed,
  4 angles) on representative slices, computed with ``xp``;
- SIFT keypoint statistics (``skimage.feature.SIFT``) and Haar-like feature statistics
  (``skimage.feature.haar_like_feature``) on the representative slices. These two exist only
  in scikit-image: on a GPU the few representative 2-D slices are copied to the host for
  them (documented in docs/plugins.md), the volume stays on the device.

The region is the voxels above ``region_threshold`` (default -500: the body on CT), or the
whole volume; representative slices are spread evenly over the region's extent.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from processors.backend import slabs, to_host
from processors.base import (
    EVERY_GREY_IMAGE,
    Accepts,
    Array,
    Code,
    Codes,
    Measurement,
    MeasurementResult,
    ProcessorError,
    ProcessorParams,
    Result,
    Units,
    Volume,
)

GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "ASM", "energy", "correlation")
HAAR_TYPES = ("type-2-x", "type-2-y", "type-3-x", "type-3-y", "type-4")


class FeaturesParams(ProcessorParams):
    region_threshold: float | None = Field(
        default=-500.0, description="region = voxels above this value; None: the whole volume"
    )
    n_slices: int = Field(
        default=3, ge=1, le=32, description="representative slices for 2-D features"
    )
    histogram_bins: int = Field(default=64, ge=2, le=4096)
    glcm_levels: int = Field(default=32, ge=2, le=256)
    glcm_range: tuple[float, float] | None = Field(
        default=(-1000.0, 1000.0), description="intensity range quantised for GLCM; None: min..max"
    )
    glcm_distance: int = Field(default=1, ge=1, le=10)
    sift: bool = True
    sift_upsampling: int = Field(default=1, ge=1, le=2)
    haar: bool = True
    haar_size: int = Field(
        default=12, ge=4, le=32, description="slice resampled to this edge for Haar"
    )

    @model_validator(mode="after")
    def _check_range(self) -> FeaturesParams:
        if self.glcm_range is not None and not self.glcm_range[0] < self.glcm_range[1]:
            raise ValueError("glcm_range must be (low, high) with low < high")
        return self


def local(name: str) -> Code:
    return Codes.local(name.lower().replace(" ", "-"), name)


# ------------------------------------------------------------------ first order


def first_order(xp: ModuleType, image: Array, mask: Array, bins: int) -> dict[str, float]:
    """Statistics of the voxels of ``image`` where ``mask`` (skewness/kurtosis as
    scipy.stats), slab by slab in float64: only the region's float32 voxels (for the
    percentiles) are ever volume-sized."""
    count = 0
    total = 0.0
    low, high = math.inf, -math.inf
    for slab in slabs(len(image)):
        values = image[slab][mask[slab]]
        if values.size:
            count += int(values.size)
            total += float(values.sum(dtype=xp.float64))
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if count == 0:
        raise ProcessorError("the feature region is empty")
    mean = total / count
    m2 = m3 = m4 = 0.0
    hist = np.zeros(bins, dtype=np.int64)
    edges = (low, high if high > low else low + 1.0)
    for slab in slabs(len(image)):
        values = image[slab][mask[slab]].astype(xp.float64)
        centred = values - mean
        squared = centred * centred
        m2 += float(squared.sum())
        m3 += float((squared * centred).sum())
        m4 += float((squared * squared).sum())
        hist += to_host(xp.histogram(values, bins=bins, range=edges)[0])
    m2, m3, m4 = m2 / count, m3 / count, m4 / count
    p10, p50, p90 = percentiles(xp, image[mask], (10.0, 50.0, 90.0))
    p = hist.astype(np.float64) / count
    nz = p[p > 0]
    return {
        "Mean": mean,
        "Standard Deviation": math.sqrt(m2),
        "Minimum": low,
        "Maximum": high,
        "Median": p50,
        "Percentile 10": p10,
        "Percentile 90": p90,
        "Skewness": m3 / m2**1.5 if m2 > 0 else 0.0,
        "Kurtosis": m4 / m2**2 - 3.0 if m2 > 0 else 0.0,
        "Entropy": float(-(nz * np.log2(nz)).sum()),
        "Uniformity": float((p**2).sum()),
    }


def percentiles(xp: ModuleType, values: Array, points: tuple[float, ...]) -> list[float]:
    """``numpy.percentile(values.astype(float64), points)`` (linear method), computed by
    partitioning ``values`` in place: no float64 copy and no second copy for sorting."""
    n = int(values.size)
    virtual = [(n - 1) * (point / 100.0) for point in points]
    below = [math.floor(index) for index in virtual]
    kth = sorted({*below, *(min(index + 1, n - 1) for index in below)})
    values.partition(xp.asarray(kth))
    out = []
    for index, lower in zip(virtual, below, strict=True):
        a = float(values[lower])
        b = float(values[min(lower + 1, n - 1)])
        gamma = index - lower
        # numpy's _lerp: from the nearer end, so that the result stays within [a, b].
        out.append(b - (b - a) * (1.0 - gamma) if gamma >= 0.5 else a + (b - a) * gamma)
    return out


# ------------------------------------------------------------------ GLCM


def quantise(xp: ModuleType, image: Array, levels: int, low: float, high: float) -> Array:
    scaled = (image.astype(xp.float64) - low) / (high - low) * levels
    return xp.clip(xp.floor(scaled), 0, levels - 1).astype(xp.int64)


def glcm(xp: ModuleType, image: Array, distance: int, levels: int) -> Array:
    """Symmetric, normalised co-occurrence matrices (levels, levels, 1, n_angles) of an
    integer 2-D image, as ``skimage.feature.graycomatrix(..., symmetric=True, normed=True)``."""
    rows, cols = image.shape
    out = []
    for angle in GLCM_ANGLES:
        dr = round(math.sin(angle) * distance)
        dc = round(math.cos(angle) * distance)
        r0, r1 = max(0, -dr), rows - max(0, dr)
        c0, c1 = max(0, -dc), cols - max(0, dc)
        first = image[r0:r1, c0:c1]
        second = image[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        counts = xp.bincount((first * levels + second).ravel(), minlength=levels * levels).reshape(
            levels, levels
        )
        counts = counts + counts.T
        total = counts.sum()
        out.append(counts.astype(xp.float64) / (total if float(total) > 0 else 1))
    return xp.stack(out, axis=-1)[:, :, None, :]


def glcm_props(xp: ModuleType, matrices: Array) -> dict[str, float]:
    """The mean over angles of skimage's graycoprops for one distance."""
    levels = matrices.shape[0]
    i = xp.arange(levels, dtype=xp.float64)[:, None, None, None]
    j = xp.arange(levels, dtype=xp.float64)[None, :, None, None]
    p = matrices
    asm = (p**2).sum(axis=(0, 1))
    mean_i = (i * p).sum(axis=(0, 1))
    mean_j = (j * p).sum(axis=(0, 1))
    std_i = xp.sqrt(((i - mean_i) ** 2 * p).sum(axis=(0, 1)))
    std_j = xp.sqrt(((j - mean_j) ** 2 * p).sum(axis=(0, 1)))
    cov = ((i - mean_i) * (j - mean_j) * p).sum(axis=(0, 1))
    flat = (std_i < 1e-15) | (std_j < 1e-15)
    correlation = xp.where(flat, 1.0, cov / xp.where(flat, 1.0, std_i * std_j))
    values = {
        "contrast": (p * (i - j) ** 2).sum(axis=(0, 1)),
        "dissimilarity": (p * xp.abs(i - j)).sum(axis=(0, 1)),
        "homogeneity": (p / (1.0 + (i - j) ** 2)).sum(axis=(0, 1)),
        "ASM": asm,
        "energy": xp.sqrt(asm),
        "correlation": correlation,
    }
    return {name: float(value.mean()) for name, value in values.items()}


# ------------------------------------------------------------------ SIFT and Haar (host)


def sift_stats(image: Any, upsampling: int) -> dict[str, float]:
    from skimage.feature import SIFT

    low, high = float(image.min()), float(image.max())
    unit = (image - low) / (high - low) if high > low else np.zeros_like(image)
    detector = SIFT(upsampling=upsampling, n_octaves=4)  # type: ignore[no-untyped-call]
    try:
        detector.detect(unit.astype(np.float64))  # type: ignore[no-untyped-call]
        sigmas = np.asarray(detector.sigmas, dtype=np.float64)
    except RuntimeError:  # no keypoints at all
        sigmas = np.zeros(0)
    return {
        "SIFT keypoints": float(sigmas.size),
        "SIFT mean sigma": float(sigmas.mean()) if sigmas.size else 0.0,
        "SIFT std sigma": float(sigmas.std()) if sigmas.size else 0.0,
    }


def haar_stats(image: Any, size: int) -> dict[str, float]:
    from skimage.feature import haar_like_feature
    from skimage.transform import integral_image, resize

    low, high = float(image.min()), float(image.max())
    unit = (image - low) / (high - low) if high > low else np.zeros_like(image)
    small = resize(  # type: ignore[no-untyped-call]
        unit.astype(np.float64), (size, size), anti_aliasing=True
    )
    integral = integral_image(small)  # type: ignore[no-untyped-call]
    values = haar_like_feature(  # type: ignore[no-untyped-call]
        integral, 0, 0, size, size, list(HAAR_TYPES)
    )
    magnitude = np.abs(values)
    return {
        "Haar mean abs": float(magnitude.mean()),
        "Haar std": float(values.std()),
        "Haar max abs": float(magnitude.max()),
    }


# ------------------------------------------------------------------ the processor


def representative_slices(xp: ModuleType, mask: Array, n: int) -> list[int]:
    """``n`` slice indices spread evenly over the slices where the region is present."""
    present = to_host(xp.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0])
    if present.size == 0:
        raise ProcessorError("the feature region is empty")
    first, last = int(present[0]), int(present[-1])
    picks = [first + (last - first) * (k + 1) / (n + 1) for k in range(n)]
    return sorted({round(p) for p in picks})


def compute_features(volume: Volume, params: FeaturesParams, xp: ModuleType) -> dict[str, float]:
    """All features by name, in a fixed order (the predict models depend on it)."""
    image = volume.array
    if params.region_threshold is None:
        mask = xp.ones(image.shape, dtype=bool)
    else:
        mask = image > params.region_threshold
    features: dict[str, float] = {}
    features.update(first_order(xp, image, mask, params.histogram_bins))
    if volume.planar:
        features["Region area"] = float(int(mask.sum())) * volume.region_size()[2]
    else:
        features["Region volume"] = float(int(mask.sum())) * volume.voxel_volume_mm3

    slices = representative_slices(xp, mask, params.n_slices)
    if params.glcm_range is not None:
        low, high = params.glcm_range
    else:
        low, high = features["Minimum"], max(features["Maximum"], features["Minimum"] + 1.0)
    texture = {name: 0.0 for name in GLCM_PROPS}
    sift_total: dict[str, float] = {}
    haar_total: dict[str, float] = {}
    for z in slices:
        plane = image[z]
        q = quantise(xp, plane, params.glcm_levels, low, high)
        for name, value in glcm_props(
            xp, glcm(xp, q, params.glcm_distance, params.glcm_levels)
        ).items():
            texture[name] += value / len(slices)
        if params.sift or params.haar:
            host = np.asarray(to_host(plane), dtype=np.float64)
            if params.sift:
                for name, value in sift_stats(host, params.sift_upsampling).items():
                    sift_total[name] = sift_total.get(name, 0.0) + value / len(slices)
            if params.haar:
                for name, value in haar_stats(host, params.haar_size).items():
                    haar_total[name] = haar_total.get(name, 0.0) + value / len(slices)
    features.update({f"GLCM {name}": value for name, value in texture.items()})
    features.update(sift_total)
    features.update(haar_total)
    return features


_STANDARD = {
    "Mean": Codes.MEAN,
    "Standard Deviation": Codes.STANDARD_DEVIATION,
    "Minimum": Codes.MINIMUM,
    "Maximum": Codes.MAXIMUM,
    "Median": Codes.MEDIAN,
    "Skewness": Codes.SKEWNESS,
    "Kurtosis": Codes.KURTOSIS,
    "Region volume": Codes.VOLUME,
    "Region area": Codes.AREA,
}


def _unit(name: str, intensity: Code, volume: Volume) -> Code:
    if name == "Region volume":
        return Units.MM3
    if name == "Region area":
        return volume.region_size()[1]
    if name in ("Mean", "Standard Deviation", "Minimum", "Maximum", "Median") or name.startswith(
        "Percentile"
    ):
        return intensity
    if name == "SIFT keypoints":
        return Units.COUNT
    return Units.NO_UNITS


class Features:
    """First-order, GLCM, SIFT and Haar features of a region -> MeasurementResult (on a 2-D
    image: the region's area, in mm2 where the image has a pixel spacing)."""

    name: ClassVar[str] = "features"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "features"
    Params: ClassVar[type[FeaturesParams]] = FeaturesParams
    accepts: ClassVar[Accepts] = EVERY_GREY_IMAGE

    def run(self, volume: Volume, params: FeaturesParams, xp: ModuleType) -> list[Result]:
        values = compute_features(volume, params, xp)
        return [
            MeasurementResult(feature_measurements(values, volume), description="Image features")
        ]


def feature_measurements(values: dict[str, float], volume: Volume) -> tuple[Measurement, ...]:
    """The features by name as coded measurements (standard codes where one exists)."""
    intensity = Units.HU if volume.modality == "CT" else Units.NO_UNITS
    return tuple(
        Measurement(
            _STANDARD.get(name, local(name)),
            value,
            _unit(name, intensity, volume),
            derivation="region" if name in _STANDARD or name.startswith("Perc") else "",
        )
        for name, value in values.items()
    )
