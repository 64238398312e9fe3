"""Denoising: mean, median, gaussian, non-local means, bilateral.

Sizes and sigmas given in mm are converted to voxels with the volume's spacing, so a
filter means the same physical thing on any grid. Each processor returns one ImageResult.
On a 2-D image or a stack of them (``Volume.planar``) each filter acts within each frame:
the same filter with no extent across frames; mean, median and Gaussian filter an RGB
image channel by channel.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from processors.backend import elementwise_kernel, is_cupy, ndimage_for, raw_kernel
from processors.base import (
    EVERY_GREY_IMAGE,
    EVERY_IMAGE,
    Accepts,
    Array,
    ImageResult,
    ProcessorParams,
    Result,
    Volume,
)

Mode = Literal["reflect", "nearest", "mirror", "constant", "wrap"]


def _float(volume: Volume, xp: ModuleType) -> Array:
    array = volume.array
    if array.dtype not in (xp.float32, xp.float64):
        array = array.astype(xp.float32)
    return array


def _image(volume: Volume, array: Array, description: str) -> list[Result]:
    return [ImageResult(volume.with_array(array), description)]


def extents(volume: Volume, values: tuple[float, ...], none: float) -> tuple[float, ...]:
    """Per-axis filter extents for ``volume``'s array: ``none`` across the frames of a
    planar image and across a colour image's channels."""
    planar = volume.in_plane(values, none)
    return (*planar, none) if volume.colour else planar


def _odd(value: int) -> int:
    if value % 2 == 0:
        raise ValueError("must be odd")
    return value


class MeanParams(ProcessorParams):
    size: int = Field(default=3, ge=1, le=31, description="cube edge in voxels (odd)")
    mode: Mode = "reflect"

    _odd = field_validator("size")(_odd)


class Mean:
    """Box (uniform) filter; reference ``scipy.ndimage.uniform_filter``."""

    name: ClassVar[str] = "mean"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[MeanParams]] = MeanParams
    accepts: ClassVar[Accepts] = EVERY_IMAGE

    def run(self, volume: Volume, params: MeanParams, xp: ModuleType) -> list[Result]:
        ndi = ndimage_for(xp)
        size = tuple(int(v) for v in extents(volume, (params.size,) * 3, 1))
        out = ndi.uniform_filter(_float(volume, xp), size=size, mode=params.mode)
        return _image(volume, out, f"Mean filter {params.size}^{2 if volume.planar else 3}")


class MedianParams(ProcessorParams):
    size: int = Field(default=3, ge=1, le=15, description="cube edge in voxels (odd)")
    mode: Mode = "reflect"

    _odd = field_validator("size")(_odd)


class Median:
    """Median filter; reference ``scipy.ndimage.median_filter``."""

    name: ClassVar[str] = "median"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[MedianParams]] = MedianParams
    accepts: ClassVar[Accepts] = EVERY_IMAGE

    def run(self, volume: Volume, params: MedianParams, xp: ModuleType) -> list[Result]:
        ndi = ndimage_for(xp)
        size = tuple(int(v) for v in extents(volume, (params.size,) * 3, 1))
        out = ndi.median_filter(_float(volume, xp), size=size, mode=params.mode)
        return _image(volume, out, f"Median filter {params.size}^{2 if volume.planar else 3}")


class GaussianParams(ProcessorParams):
    sigma_mm: float = Field(default=1.0, gt=0, le=50, description="standard deviation in mm")
    truncate: float = Field(default=4.0, gt=0, le=10, description="kernel radius in sigmas")
    mode: Mode = "reflect"


def sigma_voxels(sigma_mm: float, spacing: tuple[float, float, float]) -> tuple[float, ...]:
    return tuple(sigma_mm / s for s in spacing)


class Gaussian:
    """Gaussian smoothing with sigma in mm; reference ``scipy.ndimage.gaussian_filter``."""

    name: ClassVar[str] = "gaussian"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[GaussianParams]] = GaussianParams
    accepts: ClassVar[Accepts] = EVERY_IMAGE

    def run(self, volume: Volume, params: GaussianParams, xp: ModuleType) -> list[Result]:
        ndi = ndimage_for(xp)
        sigma = extents(volume, sigma_voxels(params.sigma_mm, volume.spacing), 0.0)
        out = ndi.gaussian_filter(
            _float(volume, xp), sigma=sigma, mode=params.mode, truncate=params.truncate
        )
        return _image(volume, out, f"Gaussian filter sigma {params.sigma_mm} mm")


# --------------------------------------------------------------------------------------
# Non-local means (the fast, shift-outer algorithm of Darbon et al. / Froment, as in
# skimage.restoration.denoise_nl_means(fast_mode=True), including its exp approximation)


def estimate_noise_sigma(array: Array, xp: ModuleType) -> float:
    """Robust noise estimate: MAD of neighbour differences along columns / sqrt(2)."""
    diff = xp.abs(array[..., 1:] - array[..., :-1]).ravel()
    mad = float(xp.median(diff))
    return mad / 0.6744897501960817 / math.sqrt(2.0)


class NLMParams(ProcessorParams):
    patch_size: int = Field(default=5, ge=3, le=11, description="patch edge in voxels (odd)")
    patch_distance: int = Field(default=3, ge=1, le=15, description="search radius in voxels")
    h: float | None = Field(
        default=None, gt=0, description="cut-off in image units; default 0.8 x the noise sigma"
    )
    sigma: float | None = Field(
        default=None, ge=0, description="noise standard deviation; default estimated from the data"
    )

    _odd = field_validator("patch_size")(_odd)


_DISTANCE_CUTOFF = 5.0
_EXP_A = 1512775.3951951856938  # 2^20 / ln 2
_EXP_BC = 1072632447  # 1023 * 2^20 - 60801


def _fast_exp(xp: ModuleType, y: Array) -> Array:
    """Schraudolph's exp approximation, bit-for-bit the one scikit-image uses."""
    high = xp.trunc(_EXP_A * y).astype(xp.int64) + _EXP_BC
    return (high << 32).view(xp.float64)


_NLM_WEIGHT_KERNEL = r"""
    double dist = fmax(D, 0.0) * inv_norm;
    double w = 0.0;
    if (dist <= 5.0) {
        long long hi = (long long)((int)(1512775.3951951856938 * (-dist)) + 1072632447);
        w = __longlong_as_double(hi << 32);
    }
    W = w;
"""


def _nlm_weights(xp: ModuleType, distance: Array, inv_norm: float) -> Array:
    if is_cupy(xp):
        kernel = elementwise_kernel(
            "float64 D, float64 inv_norm", "float64 W", _NLM_WEIGHT_KERNEL, "nlm_weight"
        )
        return kernel(distance, inv_norm)
    dist = xp.maximum(distance, 0.0) * inv_norm
    weights = _fast_exp(xp, -dist)
    weights[dist > _DISTANCE_CUTOFF] = 0.0
    return weights


def _box_sum(xp: ModuleType, values: Array, width: int) -> Array:
    """Sum over windows of ``width`` along every axis: out[k] = sum(values[k : k + width])."""
    out = values
    for axis in range(values.ndim):
        cumulative = xp.cumsum(out, axis=axis)
        zero_shape = list(out.shape)
        zero_shape[axis] = 1
        cumulative = xp.concatenate([xp.zeros(zero_shape, dtype=out.dtype), cumulative], axis)
        upper = [slice(None)] * out.ndim
        lower = [slice(None)] * out.ndim
        upper[axis] = slice(width, None)
        lower[axis] = slice(None, -width)
        out = cumulative[tuple(upper)] - cumulative[tuple(lower)]
    return out


def nl_means(
    xp: ModuleType, image: Array, patch_size: int, patch_distance: int, h: float, sigma: float
) -> Array:
    """Fast 3-D non-local means on ``xp`` (float64 internally), matching scikit-image."""
    offset = patch_size // 2
    d = patch_distance
    pad = offset + d + 1
    n = image.shape
    padded = xp.pad(image.astype(xp.float64), pad, mode="reflect")
    var2 = 2.0 * sigma * sigma
    inv_norm = 1.0 / (float(patch_size) ** 3 * h * h)
    interior = tuple(slice(pad, pad + size) for size in n)
    centre_weight = float(_fast_exp(np, np.array([0.0]))[0])
    numerator = centre_weight * padded[interior]
    denominator = xp.full(n, centre_weight, dtype=xp.float64)
    for t0 in range(-d, d + 1):
        for t1 in range(-d, d + 1):
            for t2 in range(0, d + 1):
                if t2 == 0 and (t1 < 0 or (t1 == 0 and t0 <= 0)):
                    continue  # each unordered pair of patches once; t = 0 handled above
                shift = (t0, t1, t2)
                lo = [pad - max(t, 0) for t in shift]
                hi = [pad + size - min(t, 0) for size, t in zip(n, shift, strict=True)]
                q = tuple(slice(a - offset + 1, b + offset) for a, b in zip(lo, hi, strict=True))
                q_shift = tuple(
                    slice(a - offset + 1 + t, b + offset + t)
                    for a, b, t in zip(lo, hi, shift, strict=True)
                )
                diff = padded[q] - padded[q_shift]
                diff *= diff
                diff -= var2
                weights = _nlm_weights(xp, _box_sum(xp, diff, 2 * offset), inv_norm)
                direct = tuple(
                    slice(max(t, 0), max(t, 0) + size) for t, size in zip(shift, n, strict=True)
                )
                reverse = tuple(
                    slice(max(-t, 0), max(-t, 0) + size) for t, size in zip(shift, n, strict=True)
                )
                ahead = tuple(
                    slice(pad + t, pad + t + size) for t, size in zip(shift, n, strict=True)
                )
                behind = tuple(
                    slice(pad - t, pad - t + size) for t, size in zip(shift, n, strict=True)
                )
                w_direct = weights[direct]
                w_reverse = weights[reverse]
                numerator += w_direct * padded[ahead] + w_reverse * padded[behind]
                denominator += w_direct + w_reverse
    return numerator / denominator


class NonLocalMeans:
    """Non-local means; reference ``skimage.restoration.denoise_nl_means(fast_mode=True)``.

    The CPU path calls scikit-image's compiled implementation; the GPU path runs the same
    algorithm on CuPy (shift-outer loop, a fused CUDA weight kernel).
    """

    name: ClassVar[str] = "nlm"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[NLMParams]] = NLMParams
    accepts: ClassVar[Accepts] = EVERY_GREY_IMAGE

    def run(self, volume: Volume, params: NLMParams, xp: ModuleType) -> list[Result]:
        image = _float(volume, xp)
        sigma = params.sigma
        if sigma is None:
            sigma = estimate_noise_sigma(image, xp)
        h = params.h if params.h is not None else max(0.8 * sigma, 1e-6)

        def denoise(block: Array) -> Array:
            if is_cupy(xp):
                # On one frame (a 1-slice block) the 3-D patches are the 2-D ones repeated.
                return nl_means(xp, block, params.patch_size, params.patch_distance, h, sigma)
            from skimage.restoration import denoise_nl_means

            return denoise_nl_means(
                block[0] if volume.planar else block,
                patch_size=params.patch_size,
                patch_distance=params.patch_distance,
                h=h,
                sigma=sigma,
                fast_mode=True,
                channel_axis=None,
            ).reshape(block.shape)

        if volume.planar:
            out = xp.stack([denoise(image[z : z + 1])[0] for z in range(len(image))])
        else:
            out = denoise(image)
        return _image(
            volume,
            out.astype(image.dtype, copy=False),
            f"Non-local means (patch {params.patch_size}, search {params.patch_distance}, "
            f"h {h:.3g})",
        )


# --------------------------------------------------------------------------------------
# Bilateral


class BilateralParams(ProcessorParams):
    sigma_spatial_mm: float = Field(default=1.0, gt=0, le=20, description="spatial sigma in mm")
    sigma_range: float = Field(default=50.0, gt=0, description="intensity sigma in image units")
    in_plane: bool = Field(default=False, description="filter each slice in 2-D only")


def _radii(params: BilateralParams, spacing: tuple[float, float, float]) -> tuple[int, ...]:
    sigmas = sigma_voxels(params.sigma_spatial_mm, spacing)
    radii = tuple(max(2, math.ceil(3.0 * s)) for s in sigmas)
    if params.in_plane:
        radii = (0, *radii[1:])
    return radii


_BILATERAL_SOURCE = r"""
__device__ __forceinline__ int reflect_index(int i, int n) {
    // scipy.ndimage 'reflect' (half-sample symmetric): ... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...
    int period = 2 * n;
    i = i % period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

extern "C" __global__ void bilateral3d(
    const float* __restrict__ src, float* __restrict__ dst,
    const int nz, const int ny, const int nx,
    const int rz, const int ry, const int rx,
    const float inv2sz, const float inv2sy, const float inv2sx, const float inv2sr)
{
    const long long total = (long long)nz * ny * nx;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int x = idx % nx;
        const int y = (idx / nx) % ny;
        const int z = idx / ((long long)nx * ny);
        const float centre = src[idx];
        float num = 0.f, den = 0.f;
        for (int dz = -rz; dz <= rz; ++dz) {
            const int zz = reflect_index(z + dz, nz);
            const float wz = dz * dz * inv2sz;
            for (int dy = -ry; dy <= ry; ++dy) {
                const int yy = reflect_index(y + dy, ny);
                const float wzy = wz + dy * dy * inv2sy;
                const long long row = ((long long)zz * ny + yy) * nx;
                for (int dx = -rx; dx <= rx; ++dx) {
                    const int xx = reflect_index(x + dx, nx);
                    const float v = src[row + xx];
                    const float diff = v - centre;
                    const float w = __expf(-(wzy + dx * dx * inv2sx + diff * diff * inv2sr));
                    num += w * v;
                    den += w;
                }
            }
        }
        dst[idx] = num / den;
    }
}
"""


def bilateral_xp(
    xp: ModuleType,
    image: Array,
    radii: tuple[int, ...],
    sigmas: tuple[float, ...],
    sigma_range: float,
    *,
    slab: int | None = None,
    workers: int = 1,
) -> Array:
    """Bilateral filter written against ``xp`` (a loop over window offsets, not voxels).

    The volume is processed in slabs of ``slab`` slices (cache-sized work arrays, reused
    in place), by ``workers`` threads (NumPy releases the GIL in its ufuncs).
    """
    padded = xp.pad(image, [(r, r) for r in radii], mode="symmetric")
    n = image.shape
    out = xp.empty(n, dtype=image.dtype)
    inv_range = 1.0 / (2.0 * sigma_range * sigma_range)
    offsets = []
    for dz in range(-radii[0], radii[0] + 1):
        for dy in range(-radii[1], radii[1] + 1):
            for dx in range(-radii[2], radii[2] + 1):
                log_spatial = -sum(
                    (o * o) / (2.0 * s * s) for o, s in zip((dz, dy, dx), sigmas, strict=True) if o
                )
                offsets.append((dz, dy, dx, log_spatial))

    def run(z0: int, z1: int) -> None:
        centre = image[z0:z1]
        shape = centre.shape
        numerator = xp.zeros(shape, dtype=image.dtype)
        denominator = xp.zeros(shape, dtype=image.dtype)
        work = xp.empty(shape, dtype=image.dtype)
        for dz, dy, dx, log_spatial in offsets:
            values = padded[
                radii[0] + dz + z0 : radii[0] + dz + z1,
                radii[1] + dy : radii[1] + dy + n[1],
                radii[2] + dx : radii[2] + dx + n[2],
            ]
            xp.subtract(values, centre, out=work)
            xp.multiply(work, work, out=work)
            xp.multiply(work, -inv_range, out=work)
            if log_spatial:
                xp.add(work, log_spatial, out=work)
            xp.exp(work, out=work)
            xp.add(denominator, work, out=denominator)
            xp.multiply(work, values, out=work)
            xp.add(numerator, work, out=numerator)
        xp.divide(numerator, denominator, out=out[z0:z1])

    step = n[0] if slab is None else max(1, slab)
    ranges = [(z, min(z + step, n[0])) for z in range(0, n[0], step)]
    if workers > 1 and len(ranges) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(run, a, b) for a, b in ranges]:
                future.result()
    else:
        for a, b in ranges:
            run(a, b)
    return out


def bilateral_cuda(
    xp: ModuleType,
    image: Array,
    radii: tuple[int, ...],
    sigmas: tuple[float, ...],
    sigma_range: float,
) -> Array:
    """The same filter as one CUDA kernel (a thread per voxel)."""
    kernel = raw_kernel(_BILATERAL_SOURCE, "bilateral3d")
    src = xp.ascontiguousarray(image, dtype=xp.float32)
    dst = xp.empty_like(src)
    nz, ny, nx = src.shape
    threads = 256
    blocks = min((src.size + threads - 1) // threads, 65535 * 8)

    def inv(sigma: float) -> np.float32:
        return np.float32(1.0 / (2.0 * sigma * sigma))

    kernel(
        (blocks,),
        (threads,),
        (
            src,
            dst,
            np.int32(nz),
            np.int32(ny),
            np.int32(nx),
            np.int32(radii[0]),
            np.int32(radii[1]),
            np.int32(radii[2]),
            inv(sigmas[0]),
            inv(sigmas[1]),
            inv(sigmas[2]),
            inv(sigma_range),
        ),
    )
    return dst.astype(image.dtype, copy=False)


class Bilateral:
    """Edge-preserving bilateral filter (Gaussian spatial x Gaussian range weights).

    Reference: ``skimage.restoration.denoise_bilateral`` slice by slice (``in_plane``).
    CPU: a vectorised loop over window offsets; GPU: a CUDA kernel.
    """

    name: ClassVar[str] = "bilateral"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[BilateralParams]] = BilateralParams
    accepts: ClassVar[Accepts] = EVERY_GREY_IMAGE

    def run(self, volume: Volume, params: BilateralParams, xp: ModuleType) -> list[Result]:
        image = _float(volume, xp)
        if volume.planar:
            params = params.model_copy(update={"in_plane": True})
        radii = _radii(params, volume.spacing)
        sigmas = sigma_voxels(params.sigma_spatial_mm, volume.spacing)
        if params.in_plane:
            sigmas = (1.0, *sigmas[1:])
        if is_cupy(xp):
            out = bilateral_cuda(xp, image, radii, sigmas, params.sigma_range)
        else:
            slab = max(1, (1 << 20) // max(1, image.shape[1] * image.shape[2]))
            workers = min(os.cpu_count() or 1, 8)
            out = bilateral_xp(
                xp, image, radii, sigmas, params.sigma_range, slab=slab, workers=workers
            )
        return _image(
            volume,
            out,
            f"Bilateral filter (spatial {params.sigma_spatial_mm} mm, range {params.sigma_range})",
        )
