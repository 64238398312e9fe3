"""K-means tissue classes (optionally with spatial features) -> LabelResult.

The classes are fitted inside the body (CT) or foreground (MR) mask of
``processors.segment.body_mask`` by default, so k classes are k tissues and not the air
around the patient; voxels outside the mask are label 0 and no segment. Each class is named
for what it is where the modality allows: on CT by the HU of its centre (``CT_TISSUES``),
elsewhere by its rank ("tissue class 2 of 3 (intermediate intensity)").

CPU: ``sklearn.cluster.KMeans``. GPU: Lloyd's algorithm written against ``xp``, seeded with
k-means++ on a small subsample. Labels are 1..k ordered by cluster mean intensity, so the
same tissue gets the same label whichever backend ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import numpy as np
from pydantic import Field

from processors.backend import is_cupy, slabs, to_host
from processors.base import (
    EVERY_IMAGE,
    Accepts,
    Array,
    Code,
    Codes,
    LabelResult,
    MeasurementResult,
    ProcessorError,
    Result,
    SegmentDescription,
    Volume,
    luminance,
)
from processors.segment import (
    BodyMaskParams,
    body_mask,
    intensity_unit,
    label_counts,
    segment_statistics,
)


@dataclass(frozen=True)
class CTTissue:
    """What a class whose centre lies in [lower, upper) HU is called on CT."""

    lower: float
    upper: float
    name: str
    category: Code
    type: Code


FAT = Code("256674009", "SCT", "Fat")
INF = float("inf")

#: Class centres, not voxels: a class is a mixture, so the ranges meet halfway between the
#: tissues' own values (gas -1000, lung -900..-500, fat -120..-80, water 0, muscle and
#: organs 30..80, contrast-enhanced blood up to ~150, bone 300..1500).
CT_TISSUES: tuple[CTTissue, ...] = (
    # Gas and aerated lung fall in one class (a class is a mixture: bowel gas with its
    # wall's partial volume looks like lung); coded as the air both are mostly made of.
    CTTissue(-INF, -400.0, "Air / lung", Codes.PHYSICAL_OBJECT, Codes.AIR),
    CTTissue(-400.0, -30.0, "Fat", Codes.TISSUE, FAT),
    CTTissue(-30.0, 150.0, "Soft tissue / fluid", Codes.TISSUE, Codes.SOFT_TISSUE),
    CTTissue(150.0, INF, "Bone", Codes.TISSUE, Codes.BONE),
)


def ct_tissue(centre_hu: float) -> CTTissue:
    return next(t for t in CT_TISSUES if t.lower <= centre_hu < t.upper)


def class_segments(
    volume: Volume, centres: list[float], present: list[int]
) -> list[SegmentDescription]:
    """One segment per present label (1..k, by increasing centre), named for its tissue."""
    k = len(centres)
    segments = []
    for label in present:
        centre = centres[label - 1]
        if volume.modality == "CT":
            tissue = ct_tissue(centre)
            name = f"{tissue.name} ({centre:.0f} HU)"
            segments.append(SegmentDescription(label, name, tissue.category, tissue.type))
            continue
        rank = "low" if label == 1 else "high" if label == k else "intermediate"
        if volume.colour:
            name = f"Colour class {label} of {k} ({rank} lightness)"
        else:
            name = f"Tissue class {label} of {k} ({rank} intensity)"
        segments.append(SegmentDescription(label, name, Codes.TISSUE, Codes.TISSUE))
    return segments


class KMeansParams(BodyMaskParams):
    k: int = Field(default=3, ge=2, le=16, description="number of classes")
    inside_body: bool = Field(
        default=True,
        description="cluster only the body (CT) or foreground (MR) voxels; the rest is "
        "label 0 and no segment (false: the whole volume, air included)",
    )
    spatial_weight: float = Field(
        default=0.0, ge=0, le=10, description="weight of voxel position (0: intensity only)"
    )
    max_iter: int = Field(default=100, ge=1, le=1000)
    tol: float = Field(default=1e-4, ge=0)
    n_init: int = Field(default=1, ge=1, le=10)
    # Intensity classes of a CT are the same fitted on a million voxels as on fifty
    # million, at a fiftieth of the time; every voxel is still labelled. None: fit on all.
    sample_size: int | None = Field(
        default=1_000_000,
        ge=1000,
        description="fit on a random subsample of at most this many voxels (None: all)",
    )
    seed: int = Field(default=0, ge=0)


def build_features(
    xp: ModuleType, volume: Volume, spatial_weight: float, inside: Array | None = None
) -> tuple[Array, float, float]:
    """(n, d) float32 features of the voxels ``inside`` (all when None): intensity
    standardised over those voxels [+ weighted position]; and the intensity's mean and
    standard deviation, to read the centres back in the image's units."""
    image = volume.array.astype(xp.float32)
    chosen = None if inside is None else inside.ravel()
    values = image.ravel() if chosen is None else image.ravel()[chosen]
    mean = float(values.mean())
    std = float(values.std()) or 1.0
    columns = [(values - mean) / std]
    if spatial_weight > 0:
        for axis, (n, spacing) in enumerate(zip(volume.shape, volume.spacing, strict=True)):
            if axis == 0 and volume.planar:
                continue  # the frames of a 2-D stack are not a position
            extent = max(n * spacing, 1e-6)
            coord = (xp.arange(n, dtype=xp.float32) - (n - 1) / 2.0) * (spacing / extent)
            shape = [1, 1, 1]
            shape[axis] = n
            grid = xp.broadcast_to(coord.reshape(shape), volume.shape).ravel()
            columns.append(spatial_weight * (grid if chosen is None else grid[chosen]))
    return xp.stack(columns, axis=1), mean, std


def _squared_distances(xp: ModuleType, x: Array, centres: Array) -> Array:
    return (
        (x * x).sum(axis=1, keepdims=True)
        - 2.0 * (x @ centres.T)
        + (centres * centres).sum(axis=1)[None, :]
    )


def kmeans_xp(
    xp: ModuleType,
    x: Array,
    k: int,
    *,
    max_iter: int,
    tol: float,
    n_init: int,
    seed: int,
    sample: Array | None = None,
) -> tuple[Array, Array]:
    """Lloyd's k-means on ``xp``; returns (labels 0..k-1, centres). Tolerance as sklearn's
    (relative to the mean feature variance)."""
    from sklearn.cluster import kmeans_plusplus

    fit = x if sample is None else sample
    variance = float(xp.mean(xp.var(fit, axis=0)))
    threshold = tol * variance
    rng = np.random.default_rng(seed)
    best: tuple[float, Array] | None = None
    for _ in range(n_init):
        pick = rng.choice(fit.shape[0], size=min(20000, fit.shape[0]), replace=False)
        subsample = np.asarray(to_host(fit[xp.asarray(pick)]), dtype=np.float64)
        init, _ = kmeans_plusplus(subsample, k, random_state=int(rng.integers(2**31)))
        centres = xp.asarray(init, dtype=fit.dtype)
        for _ in range(max_iter):
            labels = xp.argmin(_squared_distances(xp, fit, centres), axis=1)
            counts = xp.bincount(labels, minlength=k).astype(fit.dtype)
            sums = xp.stack(
                [xp.bincount(labels, weights=fit[:, j], minlength=k) for j in range(fit.shape[1])],
                axis=1,
            ).astype(fit.dtype)
            empty = counts == 0
            new = xp.where(empty[:, None], centres, sums / xp.maximum(counts, 1)[:, None])
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= threshold:
                break
        distances = _squared_distances(xp, fit, centres)
        inertia = float(distances.min(axis=1).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres)
    assert best is not None
    centres = best[1]
    labels = xp.argmin(_squared_distances(xp, x, centres), axis=1)
    return labels, centres


def kmeans_sklearn(
    x: Array, k: int, *, max_iter: int, tol: float, n_init: int, seed: int, sample: Array | None
) -> tuple[Array, Array]:
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, max_iter=max_iter, tol=tol, n_init=n_init, random_state=seed)
    model.fit(x if sample is None else sample)
    labels = model.labels_ if sample is None else model.predict(x)
    return labels, model.cluster_centers_


def sample_index(xp: ModuleType, n: int, params: KMeansParams) -> Array | None:
    """Sorted random rows to fit on (``params.sample_size`` of ``n``), or None for all.

    Drawn with replacement, the repeats dropped and topped up, then thinned to the size: a
    uniform subset like ``rng.choice(n, size, replace=False)``, without the permutation of
    all ``n`` rows (170 MB of int64 for a 200-slice CT's body) that choice makes.
    """
    size = params.sample_size
    if size is None or size >= n:
        return None
    rng = np.random.default_rng(params.seed)
    chosen = np.empty(0, dtype=np.int64)
    while chosen.size < size:
        # Drawn generously (repeats are many when size is a good part of n), then the
        # repeats dropped by sorting: numpy's hashing unique is ~10x slower here.
        more = rng.integers(0, n, size=2 * (size - chosen.size) + 16)
        merged = np.sort(np.concatenate([chosen, more]))
        chosen = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
    if chosen.size > size:
        chosen = np.sort(rng.choice(chosen, size=size, replace=False))
    return xp.asarray(chosen)


def intensity_classes(
    xp: ModuleType, volume: Volume, params: KMeansParams, inside: Array | None
) -> tuple[Array, list[float]]:
    """Labels 1..k (0 outside ``inside``) for intensity-only k-means, without an
    (n_voxels, 1) feature matrix; and the class centres in the image's units.

    The centres are fitted as in the general case (standardised intensity, on the sample
    when one is asked for); in one dimension the nearest centre of a voxel is found by
    counting the midpoints of the sorted centres below its value.
    """
    image = volume.array
    mean, std, count = masked_mean_std(xp, image, inside)
    pick = sample_index(xp, count, params)
    values = masked_values(xp, image, inside, None if pick is None else to_host(pick))
    fit = ((values.astype(xp.float32) - mean) / (std or 1.0))[:, None]
    options = dict(max_iter=params.max_iter, tol=params.tol, n_init=params.n_init, seed=params.seed)
    if is_cupy(xp):
        _, centres = kmeans_xp(xp, fit, params.k, **options)  # type: ignore[arg-type]
    else:
        _, centres = kmeans_sklearn(fit, params.k, sample=None, **options)  # type: ignore[arg-type]
    ordered = np.sort(np.asarray(to_host(centres), dtype=np.float64)[:, 0]) * (std or 1.0) + mean
    midpoints = (ordered[1:] + ordered[:-1]) / 2.0
    labels = xp.empty(image.shape, dtype=xp.uint8)
    for slab in slabs(len(image)):
        slab_labels = xp.ones(image[slab].shape, dtype=xp.uint8)
        for midpoint in midpoints:
            # A float64 scalar, so that float32 voxels compare as searchsorted would (in
            # float64), one pass each: k - 1 passes are 9x faster than searchsorted for k = 3.
            slab_labels += image[slab] > np.float64(midpoint)
        if inside is not None:
            slab_labels *= inside[slab]
        labels[slab] = slab_labels
    return labels, ordered.tolist()


def masked_mean_std(xp: ModuleType, image: Array, inside: Array | None) -> tuple[float, float, int]:
    """The mean and standard deviation (float64, two passes) of the voxels ``inside`` (all
    when None) and how many they are, slab by slab: no copy of the selected voxels."""
    count = 0
    total = 0.0
    for slab in slabs(len(image)):
        values = image[slab] if inside is None else image[slab][inside[slab]]
        count += int(values.size)
        total += float(values.sum(dtype=xp.float64))
    if count == 0:
        return 0.0, 0.0, 0
    mean = total / count
    squares = 0.0
    for slab in slabs(len(image)):
        values = image[slab] if inside is None else image[slab][inside[slab]]
        deviations = values.astype(xp.float64) - mean
        squares += float((deviations * deviations).sum())
    return mean, float(np.sqrt(squares / count)), count


def masked_values(
    xp: ModuleType, image: Array, inside: Array | None, ranks: np.ndarray | None
) -> Array:
    """The voxels ``inside`` (all when None) in C order, or only those at the sorted
    ``ranks`` among them: gathered slab by slab, so that only the result is volume-sized."""
    if ranks is None:
        return image.ravel() if inside is None else image[inside]
    parts = []
    offset = 0
    for slab in slabs(len(image)):
        here = image[slab].ravel()
        if inside is not None:
            here = here[inside[slab].ravel()]
        size = int(here.shape[0])
        lo, hi = np.searchsorted(ranks, [offset, offset + size])
        if hi > lo:
            parts.append(here[xp.asarray(ranks[lo:hi] - offset)])
        offset += size
    return xp.concatenate(parts) if parts else image.ravel()[:0]


def ranked_classes(
    xp: ModuleType, x: Array, params: KMeansParams, inside: Array | None, shape: tuple[int, ...]
) -> tuple[Array, np.ndarray]:
    """K-means of the rows of ``x`` (the voxels ``inside``, all when None): labels 1..k
    ordered by the centres' first feature (0 outside ``inside``), shaped ``shape``; and
    that feature of the centres, sorted."""
    pick = sample_index(xp, x.shape[0], params)
    sample = None if pick is None else x[pick]
    options = dict(max_iter=params.max_iter, tol=params.tol, n_init=params.n_init, seed=params.seed)
    if is_cupy(xp):
        labels, centres = kmeans_xp(xp, x, params.k, sample=sample, **options)  # type: ignore[arg-type]
    else:
        labels, centres = kmeans_sklearn(x, params.k, sample=sample, **options)  # type: ignore[arg-type]
    first = xp.asarray(centres)[:, 0]
    rank = xp.empty(params.k, dtype=xp.int64)
    rank[xp.argsort(first)] = xp.arange(1, params.k + 1, dtype=xp.int64)
    ranked = rank[xp.asarray(labels)].astype(xp.uint16)
    if inside is None:
        label_map = ranked
    else:
        label_map = xp.zeros(int(np.prod(shape)), dtype=xp.uint16)
        label_map[inside.ravel()] = ranked
    return label_map.reshape(shape), np.sort(np.asarray(to_host(first), dtype=np.float64))


def feature_classes(
    xp: ModuleType, volume: Volume, params: KMeansParams, inside: Array | None
) -> tuple[Array, list[float]]:
    """Labels 1..k (0 outside ``inside``) for k-means on intensity and position, ordered
    by the intensity of the centres; and those intensities in the image's units."""
    x, mean, std = build_features(xp, volume, params.spatial_weight, inside)
    label_map, ordered = ranked_classes(xp, x, params, inside, volume.shape)
    return label_map, (ordered * std + mean).tolist()


#: sRGB (D65) linear RGB -> CIE XYZ, and the D65 white point, as ``skimage.color``.
_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(xp: ModuleType, rgb: Array) -> Array:
    """RGB in [0, 1] (last axis) -> CIELAB (L in 0..100), as ``skimage.color.rgb2lab``."""
    rgb = xp.clip(rgb.astype(xp.float32), 0.0, 1.0)
    linear = xp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ xp.asarray((_RGB_TO_XYZ / _D65_WHITE[:, None]).T, dtype=xp.float32)
    f = xp.where(xyz > 0.008856, xp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return xp.stack([lightness, a, b], axis=-1)


def colour_classes(
    xp: ModuleType, volume: Volume, params: KMeansParams, inside: Array | None
) -> tuple[Array, list[float]]:
    """Labels 1..k (0 outside ``inside``) for k-means of an RGB image in CIELAB (distances
    are colour differences, CIE76), ordered by the centres' lightness; and those (L*)."""
    lab = rgb_to_lab(xp, volume.array).reshape(-1, 3)
    x = lab if inside is None else lab[inside.ravel()]
    label_map, lightness = ranked_classes(xp, x, params, inside, volume.shape)
    return label_map, lightness.tolist()


class KMeansCluster:
    """K tissue classes inside the body; reference ``sklearn.cluster.KMeans`` (adjusted
    Rand >= 0.99). A colour image is clustered in CIELAB (``colour_classes``), its body
    mask and statistics taken on its luminance; on a 2-D stack the frame is no feature."""

    name: ClassVar[str] = "kmeans"
    version: ClassVar[str] = "2.0.0"
    family: ClassVar[str] = "cluster"
    Params: ClassVar[type[KMeansParams]] = KMeansParams
    accepts: ClassVar[Accepts] = EVERY_IMAGE

    def run(self, volume: Volume, params: KMeansParams, xp: ModuleType) -> list[Result]:
        grey = luminance(volume, xp)
        inside = body_mask(xp, grey, params) if params.inside_body else None
        if inside is not None and int(inside.sum()) < params.k:
            raise ProcessorError(
                f"the body mask holds fewer voxels than k={params.k}: nothing to cluster "
                "(inside_body=false clusters the whole volume)"
            )
        if volume.colour:
            classify = colour_classes
        else:
            classify = intensity_classes if params.spatial_weight == 0 else feature_classes
        label_map, centres = classify(xp, volume, params, inside)
        sizes = label_counts(xp, label_map, params.k)
        present = [label for label in range(1, params.k + 1) if int(sizes[label]) > 0]
        stats = segment_statistics(
            xp,
            grey.array,
            label_map,
            params.k,
            volume.voxel_volume_mm3,
            intensity_unit(volume),
            volume.region_size(),
        )
        where = " inside the body" if inside is not None else ""
        return [
            LabelResult(
                label_map,
                tuple(class_segments(volume, centres, present)),
                volume,
                f"K-means, {params.k} classes{where}",
            ),
            MeasurementResult(tuple(stats), description="Cluster statistics"),
        ]
