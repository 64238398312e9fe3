"""Contrast enhancement: window (level/width), histogram equalisation, CLAHE.

Each returns an ImageResult with values in [0, 1] (float32). On a 2-D image or a stack
of them (``Volume.planar``) histogram equalisation and CLAHE work frame by frame, and
``window`` can take the image's own window from its header (``preset="header"``).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from processors.backend import is_cupy, to_host
from processors.base import (
    EVERY_GREY_IMAGE,
    GREY_IMAGES_NOT_SLIDES,
    Accepts,
    Array,
    ImageResult,
    ProcessorError,
    ProcessorParams,
    Result,
    Volume,
)

#: (level, width) in HU, the usual CT presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 400.0),
    "liver": (60.0, 150.0),
    "bone": (400.0, 1800.0),
}

Preset = Literal[
    "brain",
    "subdural",
    "stroke",
    "lung",
    "mediastinum",
    "abdomen",
    "soft_tissue",
    "liver",
    "bone",
    "header",
]


def frame_by_frame(volume: Volume, xp: ModuleType, image: Array, apply: Any) -> Array:
    """``apply`` to the whole volume, or to each frame (2-D) of a planar image."""
    if not volume.planar:
        return apply(image)
    return xp.stack([apply(image[z]) for z in range(len(image))])


def _as_float(volume: Volume, xp: ModuleType) -> Array:
    array = volume.array
    if array.dtype not in (xp.float32, xp.float64):
        array = array.astype(xp.float32)
    return array


class WindowParams(ProcessorParams):
    preset: Preset | None = Field(
        default=None,
        description="named CT window, or 'header' for the image's own (WindowCenter/Width, "
        "else its VOI LUT); overrides level/width",
    )
    level: float = Field(default=40.0, description="window centre in image units")
    width: float = Field(default=400.0, gt=0, description="window width in image units")

    def level_width(self, volume: Volume | None = None) -> tuple[float, float]:
        if self.preset == "header":
            if volume is None or volume.window is None:
                raise ProcessorError("window preset 'header': the image has no window")
            return volume.window
        if self.preset is not None:
            return WINDOW_PRESETS[self.preset]
        return self.level, self.width


class Window:
    """Linear window: ``clip((x - (level - width/2)) / width, 0, 1)``.

    Reference: ``skimage.exposure.rescale_intensity(x, in_range=(lo, hi), out_range=(0, 1))``.
    """

    name: ClassVar[str] = "window"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "enhance"
    Params: ClassVar[type[WindowParams]] = WindowParams
    accepts: ClassVar[Accepts] = EVERY_GREY_IMAGE

    def run(self, volume: Volume, params: WindowParams, xp: ModuleType) -> list[Result]:
        if params.preset == "header" and volume.window is None and volume.voi_lut is not None:
            out = volume.voi_lut.apply(_as_float(volume, xp), xp).astype(xp.float32)
            return [ImageResult(volume.with_array(out), "VOI LUT from the header")]
        level, width = params.level_width(volume)
        low = level - width / 2.0
        image = _as_float(volume, xp)
        out = xp.clip((image - low) / width, 0.0, 1.0).astype(xp.float32)
        label = f"L {level:g} W {width:g}" if params.preset in (None, "header") else params.preset
        return [ImageResult(volume.with_array(out), f"Window {label}")]


class HistEqParams(ProcessorParams):
    nbins: int = Field(default=256, ge=2, le=65536)


def equalize_hist(xp: ModuleType, image: Array, nbins: int) -> Array:
    """Global histogram equalisation, as ``skimage.exposure.equalize_hist``."""
    flat = image.ravel()
    low, high = float(flat.min()), float(flat.max())
    hist, edges = xp.histogram(flat, bins=nbins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2.0
    cdf = xp.cumsum(hist).astype(xp.float64)
    cdf = cdf / cdf[-1]
    return xp.interp(flat, centres, cdf).reshape(image.shape)


class HistEq:
    """Histogram equalisation; reference ``skimage.exposure.equalize_hist``."""

    name: ClassVar[str] = "histeq"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "enhance"
    Params: ClassVar[type[HistEqParams]] = HistEqParams
    accepts: ClassVar[Accepts] = GREY_IMAGES_NOT_SLIDES

    def run(self, volume: Volume, params: HistEqParams, xp: ModuleType) -> list[Result]:
        image = _as_float(volume, xp)
        out = frame_by_frame(
            volume, xp, image, lambda part: equalize_hist(xp, part, params.nbins)
        ).astype(xp.float32)
        return [ImageResult(volume.with_array(out), "Histogram equalisation")]


# --------------------------------------------------------------------------------------
# CLAHE: a port of skimage.exposure.equalize_adapthist (BSD-3-Clause, scikit-image team)
# to the array namespace ``xp``. The tiny per-block histograms are clipped on the host
# (a few KiB); the volume itself stays on the device.

NR_OF_GRAY = 2**14


class ClaheParams(ProcessorParams):
    kernel_size: int | None = Field(
        default=None, ge=2, description="tile edge in voxels; default 1/8 of each dimension"
    )
    clip_limit: float = Field(default=0.01, ge=0, le=1)
    nbins: int = Field(default=256, ge=2, le=NR_OF_GRAY)
    value_range: tuple[float, float] | None = Field(
        default=None,
        description="values mapped onto 0..1 before equalising (clipped) and not stretched "
        "further (the array implementation, not scikit-image's, which stretches each "
        "frame); default each frame's min..max. A slide's regions get the slide's range",
    )

    @model_validator(mode="after")
    def _check_range(self) -> ClaheParams:
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError("value_range must be (low, high) with low < high")
        return self


def _clip_histogram(hist: Any, clip_limit: int) -> Any:
    excess_mask = hist > clip_limit
    excess = hist[excess_mask]
    n_excess = excess.sum() - excess.size * clip_limit
    hist[excess_mask] = clip_limit
    bin_incr = n_excess // hist.size
    upper = clip_limit - bin_incr
    low_mask = hist < upper
    n_excess -= hist[low_mask].size * bin_incr
    hist[low_mask] += bin_incr
    mid_mask = np.logical_and(hist >= upper, hist < clip_limit)
    mid = hist[mid_mask]
    n_excess += mid.sum() - mid.size * clip_limit
    hist[mid_mask] = clip_limit
    while n_excess > 0:
        prev_n_excess = n_excess
        for index in range(hist.size):
            under_mask = hist < clip_limit
            step_size = max(1, np.count_nonzero(under_mask) // n_excess)
            under_mask = under_mask[index::step_size]
            hist[index::step_size][under_mask] += 1
            n_excess -= np.count_nonzero(under_mask)
            if n_excess <= 0:
                break
        if prev_n_excess == n_excess:
            break
    return hist


def _map_histogram(hist: Any, min_val: int, max_val: int, n_pixels: int) -> Any:
    out = np.cumsum(hist, axis=-1).astype(float)
    out *= (max_val - min_val) / n_pixels
    out += min_val
    np.clip(out, a_min=None, a_max=max_val, out=out)
    return out.astype(int)


def _unit_float32(xp: ModuleType, image: Array) -> Array:
    """``image`` (float32) scaled to [0, 1] in float32, as scikit-image's
    ``rescale_intensity`` does for a float32 image: one pass, no float64 copy."""
    low, high = image.min(), image.max()
    if high <= low:
        return xp.zeros(image.shape, xp.float32)
    return (image - low) / (high - low)


def _rescale(xp: ModuleType, image: Array, out_max: float) -> Array:
    low = image.min()
    high = image.max()
    scaled = (image.astype(xp.float64) - low) / xp.maximum(high - low, 1e-300)
    return scaled * out_max


def clahe(
    xp: ModuleType,
    image: Array,
    kernel_size: tuple[int, ...] | None,
    clip_limit: float,
    nbins: int,
    stretch: bool = True,
) -> Array:
    """CLAHE on ``xp`` for an image already scaled to [0, 1]; matches scikit-image.

    ``stretch=False``: neither the input's nor the output's own min..max is stretched onto
    the full range (as scikit-image does both), so that regions of one image scaled alike
    stay alike."""
    ndim = image.ndim
    # As skimage.img_as_uint: multiply in the input's float precision, then round.
    work = image if image.dtype == xp.float32 else image.astype(xp.float64)
    as_uint = xp.clip(xp.rint(work * work.dtype.type(65535.0)), 0, 65535)
    if stretch:
        grey = xp.round(_rescale(xp, as_uint, NR_OF_GRAY - 1)).astype(xp.uint16)
    else:  # _rescale's arithmetic with the full 0..65535 as the range
        grey = xp.round(as_uint.astype(xp.float64) / 65535.0 * (NR_OF_GRAY - 1)).astype(xp.uint16)
    if kernel_size is None:
        kernel_size = tuple(max(s // 8, 1) for s in grey.shape)
    ksize = [int(k) for k in kernel_size]

    pad_start = [k // 2 for k in ksize]
    pad_end = [(k - s % k) % k + math.ceil(k / 2.0) for k, s in zip(ksize, grey.shape, strict=True)]
    grey = xp.pad(grey, [[a, b] for a, b in zip(pad_start, pad_end, strict=True)], mode="reflect")
    bin_size = 1 + NR_OF_GRAY // nbins
    lut = xp.arange(NR_OF_GRAY, dtype=xp.uint16) // bin_size
    grey = lut[grey]

    ns_hist = [int(s / k) - 1 for s, k in zip(grey.shape, ksize, strict=True)]
    hist_blocks_shape = [v for pair in zip(ns_hist, ksize, strict=True) for v in pair]
    axis_order = [*range(0, ndim * 2, 2), *range(1, ndim * 2, 2)]
    hist_slices = tuple(slice(k // 2, k // 2 + n * k) for k, n in zip(ksize, ns_hist, strict=True))
    hist_blocks = grey[hist_slices].reshape(hist_blocks_shape)
    hist_blocks = xp.transpose(hist_blocks, axes=axis_order)
    assembled_shape = hist_blocks.shape
    n_blocks = math.prod(ns_hist)
    hist_blocks = hist_blocks.reshape((n_blocks, -1))

    kernel_elements = math.prod(ksize)
    clim = int(max(clip_limit * kernel_elements, 1)) if clip_limit > 0.0 else kernel_elements

    offsets = (xp.arange(n_blocks, dtype=xp.int64) * nbins)[:, None]
    counts = xp.bincount(
        (hist_blocks.astype(xp.int64) + offsets).ravel(), minlength=n_blocks * nbins
    ).reshape(n_blocks, nbins)
    hist = np.asarray(to_host(counts)).astype(np.int64)
    hist = np.apply_along_axis(_clip_histogram, -1, hist, clip_limit=clim)
    hist = _map_histogram(hist, 0, NR_OF_GRAY - 1, kernel_elements)
    hist = hist.reshape((*tuple(assembled_shape[:ndim]), -1))
    map_array = xp.asarray(np.pad(hist, [[1, 1] for _ in range(ndim)] + [[0, 0]], mode="edge"))

    ns_proc = [int(s / k) for s, k in zip(grey.shape, ksize, strict=True)]
    blocks_shape = [v for pair in zip(ns_proc, ksize, strict=True) for v in pair]
    blocks = xp.transpose(grey.reshape(blocks_shape), axes=axis_order)
    blocks_flattened_shape = blocks.shape
    blocks = blocks.reshape((math.prod(ns_proc), math.prod(blocks.shape[ndim:])))
    blocks = blocks.astype(xp.int64)

    grids = np.meshgrid(*[np.arange(k) / k for k in ksize[::-1]], indexing="ij")
    coeffs = [np.transpose(c).flatten() for c in grids]
    inv_coeffs = [1 - c for c in coeffs]

    result = xp.zeros(blocks.shape, dtype=xp.float32)
    for edge in np.ndindex(*([2] * ndim)):
        edge_maps = map_array[
            tuple(slice(e, e + n) for e, n in zip(edge, ns_proc, strict=True))
        ].reshape((math.prod(ns_proc), -1))
        edge_mapped = xp.take_along_axis(edge_maps, blocks, axis=-1)
        edge_coeffs = np.prod([[inv_coeffs, coeffs][e][d] for d, e in enumerate(edge[::-1])], 0)
        result += (edge_mapped * xp.asarray(edge_coeffs)).astype(result.dtype)

    result = result.astype(xp.uint16)
    result = result.reshape(blocks_flattened_shape)
    rebuild = [v for pair in zip(range(ndim), range(ndim, ndim * 2), strict=True) for v in pair]
    result = xp.transpose(result, axes=rebuild).reshape(grey.shape)
    unpad = tuple(slice(a, s - b) for a, b, s in zip(pad_start, pad_end, grey.shape, strict=True))
    out = result[unpad].astype(image.dtype if image.dtype == xp.float32 else xp.float64)
    if not stretch:
        return (out / out.dtype.type(NR_OF_GRAY - 1)).astype(out.dtype)
    return _rescale(xp, out, 1.0).astype(out.dtype)


class Clahe:
    """Contrast-limited adaptive histogram equalisation in 3-D (in 2-D, frame by frame, on
    a planar image).

    The volume (each frame) is first scaled to [0, 1] by its min and max. Reference:
    ``skimage.exposure.equalize_adapthist``; the CPU path calls it, the GPU path runs the
    same algorithm on CuPy.
    """

    name: ClassVar[str] = "clahe"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "enhance"
    Params: ClassVar[type[ClaheParams]] = ClaheParams
    accepts: ClassVar[Accepts] = EVERY_GREY_IMAGE

    def run(self, volume: Volume, params: ClaheParams, xp: ModuleType) -> list[Result]:
        image = _as_float(volume, xp).astype(xp.float32, copy=False)

        def equalise(part: Array) -> Array:
            kernel = None if params.kernel_size is None else (params.kernel_size,) * part.ndim
            if params.value_range is not None:
                low, high = params.value_range
                unit = xp.clip((part - low) / (high - low), 0.0, 1.0).astype(xp.float32)
                return clahe(xp, unit, kernel, params.clip_limit, params.nbins, stretch=False)
            unit = _unit_float32(xp, part)
            if is_cupy(xp):
                return clahe(xp, unit, kernel, params.clip_limit, params.nbins)
            from skimage.exposure import equalize_adapthist

            return equalize_adapthist(
                unit, kernel_size=kernel, clip_limit=params.clip_limit, nbins=params.nbins
            )

        out = frame_by_frame(volume, xp, image, equalise).astype(xp.float32, copy=False)
        return [ImageResult(volume.with_array(out), "CLAHE")]
