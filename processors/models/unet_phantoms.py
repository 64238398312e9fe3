"""Chest CT phantoms for the shipped U-Net: random anatomy with its truth (lungs, lesions).

Plain NumPy/SciPy, so that the tests, the benchmarks and the training script
(``train_unet``) share them without PyTorch. Training cases use seeds ``SEED_TRAIN + i``;
the held-out set, which the model card and the tests measure, ``SEED_HELD_OUT + i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.ndimage as ndi

#: Seeds: training cases use SEED_TRAIN + i, held-out cases SEED_HELD_OUT + i.
SEED_TRAIN = 0
SEED_HELD_OUT = 1_000_000
#: Further evaluation sets drawn like the held-out one, to show the spread of the Dice.
SEEDS_OTHER_SETS = (2_000_000, 3_000_000)

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Case:
    """A generated CT volume in HU and its truth (0 background, 1 lung, 2 lesion)."""

    image: FloatArray
    labels: LabelArray
    spacing: tuple[float, float, float]
    noise_sigma: float


def _grid(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[FloatArray, FloatArray, FloatArray]:
    axes = [
        ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)
        for n, s in zip(shape, spacing, strict=True)
    ]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def make_ct_case(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    pixel_range: tuple[float, float] = (0.6, 1.2),
) -> Case:
    """One chest-like CT phantom with random anatomy, intensities, noise and blur.

    An elliptical body (soft tissue 20-60 HU) with a subcutaneous fat layer (-120..-80
    HU), two lungs (-900..-780 HU) of random size and position, a spine (400-1000 HU),
    low-contrast organ-like blobs (+5..+15 HU, not labelled), and 0-3 ellipsoidal
    lesions of 8-24 mm semi-axes: in soft tissue hyper- or hypodense by 35-90 HU, in a
    lung as nodules of -100..+60 HU. Blurred by a Gaussian point-spread function (0.6-1.4
    mm) and given Gaussian noise (5-30 HU, slightly correlated). Without ``shape`` and
    ``spacing`` both are drawn at random (``pixel_range`` mm pixels, 1.5-5 mm slices, a field of
    view of 300-420 mm and 80-140 mm in z).
    """
    rng = np.random.default_rng(seed)
    if spacing is None:
        pixel = float(rng.uniform(*pixel_range))
        spacing = (float(rng.uniform(1.5, 5.0)), pixel, pixel)
    if shape is None:
        fov = float(rng.uniform(300.0, 420.0))
        depth = float(rng.uniform(80.0, 140.0))
        n_xy = round(fov / spacing[1])
        shape = (max(round(depth / spacing[0]), 8), n_xy, n_xy)
    zz, yy, xx = _grid(shape, spacing)
    fov_x = shape[2] * spacing[2]
    fov_y = shape[1] * spacing[1]
    tissue = float(rng.uniform(20.0, 60.0))

    half_w = fov_x * float(rng.uniform(0.33, 0.46))
    half_d = min(fov_y * float(rng.uniform(0.24, 0.34)), 0.95 * fov_y / 2)
    cx, cy = float(rng.normal(0, 8)), float(rng.normal(0, 8))
    body_r = ((xx - cx) / half_w) ** 2 + ((yy - cy) / half_d) ** 2
    body = np.broadcast_to(body_r <= 1.0, shape)
    fat_thickness = float(rng.uniform(0.04, 0.12))
    fat = np.broadcast_to(body_r > (1.0 - fat_thickness) ** 2, shape) & body

    lung_z = float(rng.uniform(0.5, 1.1)) * shape[0] * spacing[0] / 2
    lung_zc = float(rng.normal(0, 10))
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lx = cx + side * half_w * float(rng.uniform(0.38, 0.52))
        ly = cy - half_d * float(rng.uniform(0.0, 0.2))
        ax = half_w * float(rng.uniform(0.24, 0.36))
        ay = half_d * float(rng.uniform(0.5, 0.7))
        lungs |= ((xx - lx) / ax) ** 2 + ((yy - ly) / ay) ** 2 + ((zz - lung_zc) / lung_z) ** 2 <= 1
    lungs &= body & ~fat
    spine_r = half_d * float(rng.uniform(0.1, 0.15))
    spine_y = cy + half_d * float(rng.uniform(0.55, 0.7))
    spine = np.broadcast_to((xx - cx) ** 2 + (yy - spine_y) ** 2 <= spine_r**2, shape) & body

    values = np.full(shape, -1000.0, dtype=np.float32)
    values[body] = tissue
    values[fat] = float(rng.uniform(-120.0, -80.0))
    lung_hu = float(rng.uniform(-900.0, -780.0))
    values[lungs] = lung_hu
    values[spine] = float(rng.uniform(400.0, 1000.0))

    soft = body & ~fat & ~lungs & ~spine
    for _ in range(int(rng.integers(0, 3))):  # unlabelled organ-like blobs
        centre = (rng.normal(0, 20), cy + rng.normal(0, half_d * 0.3), rng.normal(0, half_w * 0.3))
        axes = rng.uniform(20.0, 50.0, size=3)
        blob = (
            ((zz - centre[0]) / axes[0]) ** 2
            + ((yy - centre[1]) / axes[1]) ** 2
            + ((xx - centre[2]) / axes[2]) ** 2
        ) <= 1
        values[blob & soft] = tissue + float(rng.uniform(5.0, 15.0))

    lesions = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(0, 4))):
        in_lung = bool(rng.random() < 0.35)
        region = lungs if in_lung else soft
        candidates = np.argwhere(ndi.binary_erosion(region, iterations=2))
        if len(candidates) == 0:
            continue
        zc, yc, xc = candidates[int(rng.integers(len(candidates)))]
        centre_mm = (zz.ravel()[zc], yy.ravel()[yc], xx.ravel()[xc])
        semi = rng.uniform(8.0, 24.0) * rng.uniform(0.8, 1.2, size=3)
        blob = (
            ((zz - centre_mm[0]) / semi[0]) ** 2
            + ((yy - centre_mm[1]) / semi[1]) ** 2
            + ((xx - centre_mm[2]) / semi[2]) ** 2
        ) <= 1
        blob &= body & ~fat & ~spine
        if in_lung:
            # A nodule stays inside its lung: drawn at -100..+60 HU, a part grown into
            # soft tissue of 20-60 HU would be labelled but invisible.
            blob &= lungs
            values[blob] = float(rng.uniform(-100.0, 60.0))
        else:
            sign = 1.0 if rng.random() < 0.7 else -1.0
            values[blob] = tissue + sign * float(rng.uniform(35.0, 90.0))
        lesions |= blob

    psf_mm = float(rng.uniform(0.6, 1.4))
    values = ndi.gaussian_filter(values, [psf_mm / s for s in spacing], mode="nearest")
    noise_sigma = float(rng.uniform(5.0, 30.0))
    noise = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    corr = float(rng.uniform(0.0, 0.7))
    if corr > 0:
        noise = ndi.gaussian_filter(noise, (0.0, corr, corr))
        noise /= max(float(noise.std()), 1e-6)
    values = (values + noise_sigma * noise).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[lungs & ~lesions] = 1
    labels[lesions] = 2
    return Case(
        values, labels, (float(spacing[0]), float(spacing[1]), float(spacing[2])), noise_sigma
    )


def evaluation_case(seed_base: int, index: int) -> Case:
    """Phantom ``index`` of the evaluation set ``seed_base``: never a training seed; a
    smaller field of view so that evaluating runs in seconds (about 40 x 160 x 160 voxels
    at 1.6-2.4 mm)."""
    rng = np.random.default_rng(seed_base + 7919 * index)
    pixel = float(rng.uniform(1.6, 2.4))
    spacing = (float(rng.uniform(2.0, 4.0)), pixel, pixel)
    n = round(float(rng.uniform(260.0, 340.0)) / pixel)
    shape = (round(float(rng.uniform(90.0, 120.0)) / spacing[0]), n, n)
    return make_ct_case(seed_base + index, shape, spacing)


def held_out_case(index: int) -> Case:
    """Held-out phantom ``index``: the set the model card and the tests measure."""
    return evaluation_case(SEED_HELD_OUT, index)
