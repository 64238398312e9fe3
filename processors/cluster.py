"""K-means intensity classes (optionally with spatial features) -> LabelResult.

CPU: ``sklearn.cluster.KMeans``. GPU: Lloyd's algorithm written against ``xp``, seeded with
k-means++ on a small subsample. Labels are 1..k ordered by cluster mean intensity, so the
same tissue gets the same label whichever backend ran.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import numpy as np
from pydantic import Field

from processors.backend import is_cupy, to_host
from processors.base import (
    Array,
    Codes,
    LabelResult,
    MeasurementResult,
    ProcessorParams,
    Result,
    SegmentDescription,
    Volume,
)
from processors.segment import intensity_unit, segment_statistics


class KMeansParams(ProcessorParams):
    k: int = Field(default=3, ge=2, le=16, description="number of classes")
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


def build_features(xp: ModuleType, volume: Volume, spatial_weight: float) -> Array:
    """(n_voxels, d) float32 features: standardised intensity [+ weighted position]."""
    image = volume.array.astype(xp.float32)
    mean = float(image.mean())
    std = float(image.std()) or 1.0
    columns = [((image - mean) / std).ravel()]
    if spatial_weight > 0:
        for axis, (n, spacing) in enumerate(zip(volume.shape, volume.spacing, strict=True)):
            extent = max(n * spacing, 1e-6)
            coord = (xp.arange(n, dtype=xp.float32) - (n - 1) / 2.0) * (spacing / extent)
            shape = [1, 1, 1]
            shape[axis] = n
            grid = xp.broadcast_to(coord.reshape(shape), volume.shape)
            columns.append((spatial_weight * grid).ravel())
    return xp.stack(columns, axis=1)


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


def intensity_classes(xp: ModuleType, volume: Volume, params: KMeansParams) -> Array:
    """Labels 1..k for intensity-only k-means, without an (n_voxels, 1) feature matrix.

    The centres are fitted as in the general case (standardised intensity, on the sample
    when one is asked for); in one dimension the nearest centre of a voxel is found by
    where its value falls between the midpoints of the sorted centres.
    """
    flat = volume.array.ravel()
    mean = float(flat.mean(dtype=xp.float64))
    std = float(flat.std(dtype=xp.float64)) or 1.0
    values = flat
    if params.sample_size is not None and params.sample_size < flat.shape[0]:
        rng = np.random.default_rng(params.seed)
        pick = np.sort(rng.choice(flat.shape[0], size=params.sample_size, replace=False))
        values = flat[xp.asarray(pick)]
    fit = ((values.astype(xp.float32) - mean) / std)[:, None]
    options = dict(max_iter=params.max_iter, tol=params.tol, n_init=params.n_init, seed=params.seed)
    if is_cupy(xp):
        _, centres = kmeans_xp(xp, fit, params.k, **options)  # type: ignore[arg-type]
    else:
        _, centres = kmeans_sklearn(fit, params.k, sample=None, **options)  # type: ignore[arg-type]
    ordered = np.sort(np.asarray(to_host(centres), dtype=np.float64)[:, 0]) * std + mean
    midpoints = xp.asarray((ordered[1:] + ordered[:-1]) / 2.0)
    labels = xp.searchsorted(midpoints, flat) + 1
    return labels.astype(xp.uint16).reshape(volume.shape)


class KMeansCluster:
    """K intensity classes; reference ``sklearn.cluster.KMeans`` (adjusted Rand >= 0.99)."""

    name: ClassVar[str] = "kmeans"
    version: ClassVar[str] = "1.1.0"
    family: ClassVar[str] = "cluster"
    Params: ClassVar[type[KMeansParams]] = KMeansParams

    def run(self, volume: Volume, params: KMeansParams, xp: ModuleType) -> list[Result]:
        if params.spatial_weight == 0:
            label_map = intensity_classes(xp, volume, params)
        else:
            label_map = self._feature_classes(xp, volume, params)
        sizes = to_host(xp.bincount(label_map.ravel(), minlength=params.k + 1))
        present = [label for label in range(1, params.k + 1) if int(sizes[label]) > 0]
        segments = tuple(
            SegmentDescription(label, f"Intensity class {label}", Codes.TISSUE, Codes.TISSUE)
            for label in present
        )
        stats = segment_statistics(
            xp, volume.array, label_map, params.k, volume.voxel_volume_mm3, intensity_unit(volume)
        )
        return [
            LabelResult(label_map, segments, volume, f"K-means, {params.k} classes"),
            MeasurementResult(tuple(stats), description="Cluster statistics"),
        ]

    def _feature_classes(self, xp: ModuleType, volume: Volume, params: KMeansParams) -> Array:
        x = build_features(xp, volume, params.spatial_weight)
        sample = None
        if params.sample_size is not None and params.sample_size < x.shape[0]:
            rng = np.random.default_rng(params.seed)
            pick = np.sort(rng.choice(x.shape[0], size=params.sample_size, replace=False))
            sample = x[xp.asarray(pick)]
        options = dict(
            max_iter=params.max_iter, tol=params.tol, n_init=params.n_init, seed=params.seed
        )
        if is_cupy(xp):
            labels, centres = kmeans_xp(xp, x, params.k, sample=sample, **options)  # type: ignore[arg-type]
        else:
            labels, centres = kmeans_sklearn(x, params.k, sample=sample, **options)  # type: ignore[arg-type]
        # Relabel 1..k by increasing intensity centre.
        intensity = xp.asarray(centres)[:, 0]
        rank = xp.empty(params.k, dtype=xp.int64)
        rank[xp.argsort(intensity)] = xp.arange(1, params.k + 1, dtype=xp.int64)
        return rank[xp.asarray(labels)].astype(xp.uint16).reshape(volume.shape)
