"""Threshold segmentation: HU presets or Otsu, morphology, connected components.

Returns a LabelResult (one segment, or one per kept component) and a MeasurementResult
with each segment's volume (area on a 2-D image) and intensity statistics; on a 2-D image
or a stack of them, morphology and components stay within each frame. The ``body`` preset
is a body mask (``body_mask``): the patient without the table, cushions and blankets,
with both arms and with the lungs and bowel gas inside; ``kmeans`` clusters inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from processors.backend import ndimage_for, slabs, to_host
from processors.base import (
    EVERY_GREY_IMAGE,
    Accepts,
    Array,
    Code,
    Codes,
    LabelResult,
    Measurement,
    MeasurementResult,
    ProcessorParams,
    Result,
    SegmentDescription,
    Units,
    Volume,
)


@dataclass(frozen=True)
class HUPreset:
    lower: float
    upper: float
    category: Code
    type: Code


INF = float("inf")

#: The body's edge on CT: halfway between air (-1000 HU) and fat or soft tissue.
CT_BODY_THRESHOLD_HU = -500.0
#: The grid (mm per pixel) on which the body's parts are told from thin shells: coarse
#: enough to be cheap on a 512 x 512 x 200 volume, fine enough for a 3 mm table top.
COARSE_PIXEL_MM = 2.0
#: The sizes in millimetres (coarse grid, opening, thickness) are meant for a field of
#: view that holds a trunk or a head; on a smaller one (a crop, a test image) they shrink
#: in proportion, so that a 20 mm field of view still has a body.
FULL_FIELD_OF_VIEW_MM = 160.0

HU_PRESETS: dict[str, HUPreset] = {
    "body": HUPreset(CT_BODY_THRESHOLD_HU, INF, Codes.ANATOMICAL_STRUCTURE, Codes.ENTIRE_BODY),
    "bone": HUPreset(300.0, INF, Codes.TISSUE, Codes.BONE),
    "lung": HUPreset(-950.0, -500.0, Codes.ANATOMICAL_STRUCTURE, Codes.LUNG),
    "air": HUPreset(-INF, -950.0, Codes.PHYSICAL_OBJECT, Codes.AIR),
}


class BodyMaskParams(ProcessorParams):
    """How the body (or, on MR, the foreground) is told from air, table and blankets."""

    body_threshold: float | None = Field(
        default=None,
        description="body: lowest value of the body (default -500 HU on CT, the "
        "histogram's triangle threshold on other modalities)",
    )
    body_opening_mm: float = Field(
        default=3.0,
        ge=0,
        le=20,
        description="body: in-plane opening radius (mm) that cuts thin shells "
        "(table top, blankets, cables) from the patient",
    )
    body_min_thickness_mm: float = Field(
        default=20.0,
        ge=0,
        le=200,
        description="body: parts thinner than this (mm; tables, cushions) are not body",
    )
    body_min_area_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="body: parts smaller than this fraction of the slice's largest part "
        "are not body (arms and legs are kept)",
    )


class ThresholdParams(BodyMaskParams):
    preset: Literal["body", "bone", "lung", "air", "otsu", "custom"] = "body"
    lower: float | None = Field(default=None, description="custom: lowest value inside (inclusive)")
    upper: float | None = Field(
        default=None, description="custom: highest value inside (inclusive)"
    )
    otsu_bins: int = Field(default=256, ge=2, le=65536)
    opening_iterations: int = Field(default=0, ge=0, le=20)
    closing_iterations: int = Field(default=0, ge=0, le=20)
    fill_holes: bool = False
    connectivity: int = Field(default=1, ge=1, le=3, description="1: faces, 2: +edges, 3: +corners")
    keep_largest: int | None = Field(default=None, ge=1, le=1000, description="keep the k largest")
    min_size_voxels: int = Field(default=0, ge=0)
    separate_components: bool = Field(default=False, description="one segment per kept component")
    segment_name: str | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _check_custom(self) -> ThresholdParams:
        if self.preset == "custom":
            if self.lower is None and self.upper is None:
                raise ValueError("preset 'custom' needs lower and/or upper")
            if self.lower is not None and self.upper is not None and self.lower > self.upper:
                raise ValueError("lower must not exceed upper")
        return self


def threshold_otsu(xp: ModuleType, image: Array, nbins: int = 256) -> float:
    """Otsu's threshold, as ``skimage.filters.threshold_otsu`` computes it."""
    flat = image.ravel()
    low, high = float(flat.min()), float(flat.max())
    if low == high:
        return low
    counts, edges = xp.histogram(flat, bins=nbins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2.0
    counts = counts.astype(xp.float32)
    weight1 = xp.cumsum(counts)
    weight2 = xp.cumsum(counts[::-1])[::-1]
    mean1 = xp.cumsum(counts * centres) / weight1
    mean2 = (xp.cumsum((counts * centres)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(xp.argmax(variance12))])


def threshold_triangle(xp: ModuleType, image: Array, nbins: int = 256) -> float:
    """Zack's triangle threshold, as ``skimage.filters.threshold_triangle`` computes it.

    Made for a histogram with one tall peak and a long tail: the background of an MR
    (air) against the tissue, where Otsu's threshold falls between two tissues instead.
    """
    flat = image.ravel()
    low, high = float(flat.min()), float(flat.max())
    if low == high:
        return low
    counts, edges = xp.histogram(flat, bins=nbins, range=(low, high))
    hist = np.asarray(to_host(counts), dtype=np.float64)
    centres = np.asarray(to_host((edges[:-1] + edges[1:]) / 2.0), dtype=np.float64)
    peak = int(np.argmax(hist))
    occupied = np.flatnonzero(hist)
    first, last = int(occupied[0]), int(occupied[-1])
    # The triangle spans from the peak to the far end of the histogram's support.
    towards_high = peak - first < last - peak
    if towards_high:
        hist, peak, first = hist[::-1], nbins - 1 - peak, nbins - 1 - last
    width = peak - first
    if width == 0:
        return float(centres[peak])
    offsets = np.arange(width)
    norm = float(np.hypot(hist[peak], width))
    distance = (hist[peak] / norm) * offsets - (width / norm) * hist[first + offsets]
    level = int(np.argmax(distance)) + first
    return float(centres[nbins - 1 - level if towards_high else level])


def in_plane_structure(xp: ModuleType) -> Array:
    """Face connectivity within a slice and none across slices (per-slice labelling)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    return xp.asarray(structure)


def plane_of(xp: ModuleType, structure: Array) -> Array:
    """A 3x3x3 structuring element cut to its middle plane: no reach across frames."""
    flat = xp.zeros_like(structure)
    flat[1] = structure[1]
    return flat


def in_plane_disk(xp: ModuleType, radius_mm: float, pixel_mm: tuple[float, float]) -> Array:
    """A (1, h, w) disk of ``radius_mm`` on pixels of ``pixel_mm`` (rows, columns)."""
    row_mm, column_mm = pixel_mm
    rows, columns = int(radius_mm // row_mm), int(radius_mm // column_mm)
    y, x = np.mgrid[-rows : rows + 1, -columns : columns + 1]
    return xp.asarray(((y * row_mm) ** 2 + (x * column_mm) ** 2 <= radius_mm**2)[None])


def block_majority(xp: ModuleType, mask: Array, rows: int, columns: int) -> Array:
    """Each slice on a grid ``rows`` x ``columns`` times coarser: true where most of a
    block is (blocks at the far edges are padded with false)."""
    z, h, w = mask.shape
    padded = xp.pad(mask, ((0, 0), (0, -h % rows), (0, -w % columns))).view(xp.uint8)
    counts = xp.zeros((z, padded.shape[1] // rows, padded.shape[2] // columns), dtype=xp.int32)
    # One strided view per position in the block: no reshape copy of the whole volume.
    for row in range(rows):
        for column in range(columns):
            counts += padded[:, row::rows, column::columns]
    return counts * 2 >= rows * columns


def fill_holes_in_plane(xp: ModuleType, mask: Array) -> Array:
    """Fill, slice by slice, the background that does not reach the slice's edge."""
    ndi = ndimage_for(xp)
    background, count = ndi.label(~mask, structure=in_plane_structure(xp))
    reaches_edge = xp.zeros(int(count) + 1, dtype=bool)
    for edge in (background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]):
        reaches_edge[edge.ravel()] = True
    reaches_edge[0] = False
    return ~reaches_edge[background]


def components_touching(xp: ModuleType, mask: Array, seeds: Array) -> Array:
    """The connected parts of each slice of ``mask`` that hold a ``seeds`` voxel."""
    ndi = ndimage_for(xp)
    labels, count = ndi.label(mask, structure=in_plane_structure(xp))
    touched = xp.zeros(int(count) + 1, dtype=bool)
    touched[labels[seeds & mask]] = True
    touched[0] = False
    return touched[labels]


def box_around(xp: ModuleType, rows_any: Array, columns_any: Array) -> tuple[slice, slice] | None:
    """The rows and columns where a mask has voxels (``rows_any``/``columns_any``: over
    all its slices), with a ring of one pixel around them where the image allows; None when
    the mask is empty."""
    rows = xp.flatnonzero(rows_any)
    columns = xp.flatnonzero(columns_any)
    if rows.size == 0:
        return None
    top, bottom = max(int(rows[0]) - 1, 0), int(rows[-1]) + 2
    left, right = max(int(columns[0]) - 1, 0), int(columns[-1]) + 2
    return slice(top, bottom), slice(left, right)


def upsample(
    xp: ModuleType, coarse: Array, rows: int, columns: int, shape: tuple[int, ...]
) -> Array:
    """Undo ``block_majority``'s grid: each coarse pixel back to its block."""
    full = xp.repeat(xp.repeat(coarse, rows, axis=1), columns, axis=2)
    return full[:, : shape[1], : shape[2]]


def thick_parts(
    xp: ModuleType,
    mask: Array,
    pixel_mm: tuple[float, float],
    thickness_mm: float,
    area_fraction: float,
) -> Array:
    """The connected parts of each slice of ``mask`` that are body-like: some point of the
    part lies ``thickness_mm / 2`` inside it (a table top, a cushion or a blanket is
    thinner than that however wide it is) and the part is at least ``area_fraction`` of
    the slice's largest such part."""
    ndi = ndimage_for(xp)
    labels, count = ndi.label(mask, structure=in_plane_structure(xp))
    count = int(count)
    core = ndi.binary_erosion(mask, structure=in_plane_disk(xp, thickness_mm / 2.0, pixel_mm))
    thick = xp.zeros(count + 1, dtype=bool)
    thick[labels[core]] = True
    thick[0] = False
    areas = xp.bincount(labels.ravel(), minlength=count + 1)
    area = xp.where(thick, areas, 0)[labels]
    largest = area.reshape(area.shape[0], -1).max(axis=1)
    return (area > 0) & (area >= area_fraction * largest[:, None, None])


def foreground_threshold(xp: ModuleType, volume: Volume) -> float:
    """-500 HU on CT; elsewhere (MR, unknown units) the triangle threshold of the
    histogram, which separates the air's tall peak from the tissue."""
    if volume.modality == "CT":
        return CT_BODY_THRESHOLD_HU
    return threshold_triangle(xp, volume.array)


def body_mask(xp: ModuleType, volume: Volume, params: BodyMaskParams | None = None) -> Array:
    """The patient's body (CT) or foreground (MR): a boolean array shaped like the volume.

    Above ``body_threshold`` (default ``foreground_threshold``) on a ~2 mm grid, an in-plane
    opening cuts thin shells (the table top, blankets) from the patient; the body-like
    parts of each slice are kept (``thick_parts``: the trunk or head and each arm or leg,
    not the table); back on the full grid, the voxels above the threshold near those parts
    and joined to them are the body, with its holes (lungs, bowel gas, sinuses) filled
    slice by slice.
    """
    params = params or BodyMaskParams()
    ndi = ndimage_for(xp)
    image = volume.array
    level = params.body_threshold
    if level is None:
        level = foreground_threshold(xp, volume)
    _, row_mm, column_mm = volume.spacing
    field_mm = min(volume.shape[1] * row_mm, volume.shape[2] * column_mm)
    scale = min(1.0, field_mm / FULL_FIELD_OF_VIEW_MM)
    rows = max(1, round(scale * COARSE_PIXEL_MM / row_mm))
    columns = max(1, round(scale * COARSE_PIXEL_MM / column_mm))
    pixel_mm = (row_mm * rows, column_mm * columns)
    opening_mm = scale * params.body_opening_mm
    thickness_mm = scale * params.body_min_thickness_mm
    coarse = xp.concatenate(
        [block_majority(xp, image[slab] > level, rows, columns) for slab in slabs(len(image))]
    )
    if opening_mm > 0:
        coarse = ndi.binary_opening(coarse, structure=in_plane_disk(xp, opening_mm, pixel_mm))
    parts = thick_parts(xp, coarse, pixel_mm, thickness_mm, params.body_min_area_fraction)
    # Back on the full grid: what the opening and the coarse grid shaved off the skin (an
    # ear, a nose) comes back if it is near a part and joined to it, so that a blanket a
    # few millimetres off the skin stays out. Slab by slab (every step is in-plane), so
    # that the full-grid temporaries are a slab's.
    reach = in_plane_disk(xp, opening_mm + max(pixel_mm), pixel_mm)
    near = ndi.binary_dilation(parts, structure=reach)
    core = ndi.binary_erosion(parts, structure=in_plane_structure(xp))

    def candidate(slab: slice) -> Array:
        shape = (slab.stop - slab.start, *image.shape[1:])
        return (image[slab] > level) & upsample(xp, near[slab], rows, columns, shape)

    rows_any = xp.zeros(image.shape[1], dtype=bool)
    columns_any = xp.zeros(image.shape[2], dtype=bool)
    for slab in slabs(len(image)):
        found = candidate(slab)
        rows_any |= found.any(axis=(0, 2))
        columns_any |= found.any(axis=(0, 1))
    body = xp.zeros(image.shape, dtype=bool)
    box = box_around(xp, rows_any, columns_any)
    if box is None:
        return body
    for slab in slabs(len(image)):
        shape = (slab.stop - slab.start, *image.shape[1:])
        inner = upsample(xp, core[slab], rows, columns, shape)[(slice(None), *box)]
        joined = components_touching(xp, candidate(slab)[(slice(None), *box)], inner)
        body[(slab, *box)] = fill_holes_in_plane(xp, joined)
    return body


def keep_components(
    xp: ModuleType,
    mask: Array,
    connectivity: int,
    keep_largest: int | None,
    min_size: int,
    separate: bool,
    planar: bool = False,
) -> tuple[Array, int]:
    """Label the mask's components and keep the k largest at least ``min_size`` big
    (``planar``: components within each frame, none joined across frames).

    Returns (labels, count): labels 1..count by decreasing size when ``separate``, else a
    0/1 map. Ties in size keep the lower component index (scipy's labelling order).
    """
    if keep_largest is None and min_size <= 1 and not separate:
        # Every component kept, merged: the mask itself, without labelling it.
        if not bool(mask.any()):
            return xp.zeros(mask.shape, dtype=xp.uint8), 0
        return mask.astype(bool, copy=False).view(xp.uint8), 1
    ndi = ndimage_for(xp)
    structure = ndi.generate_binary_structure(3, connectivity)
    if planar:
        structure = plane_of(xp, structure)
    labels, count = ndi.label(mask, structure=structure)
    count = int(count)
    if count == 0:
        return xp.zeros(mask.shape, dtype=xp.uint16), 0
    sizes = xp.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    # Order by size (descending), then by index (ascending): unique integer keys.
    index = xp.arange(1, count + 1, dtype=xp.int64)
    order = xp.argsort(-sizes[1:].astype(xp.int64) * (count + 1) + index) + 1
    ordered_sizes = sizes[order]
    keep = ordered_sizes >= max(min_size, 1)
    if keep_largest is not None:
        keep[keep_largest:] = False
    kept = order[keep]
    n_kept = int(kept.size)
    # Cheap special cases (one comparison instead of a gather through a lookup table).
    if n_kept == 0:
        return xp.zeros(mask.shape, dtype=xp.uint8), 0
    if n_kept == 1:
        return (labels == int(kept[0])).view(xp.uint8), 1
    if not separate and n_kept == count:
        return (labels > 0).view(xp.uint8), 1
    lut = xp.zeros(count + 1, dtype=xp.uint16)
    if separate:
        lut[kept] = xp.arange(1, n_kept + 1, dtype=xp.uint16)
    else:
        lut[kept] = 1
    return lut[labels], (n_kept if separate else min(n_kept, 1))


def segment_mask(xp: ModuleType, volume: Volume, params: ThresholdParams) -> Array:
    """The thresholded, morphologically cleaned mask (before component selection)."""
    ndi = ndimage_for(xp)
    image = volume.array
    if params.preset == "body":
        mask = body_mask(xp, volume, params)
    elif params.preset == "otsu":
        mask = image > threshold_otsu(xp, image, params.otsu_bins)
    else:
        if params.preset == "custom":
            lower = -INF if params.lower is None else params.lower
            upper = INF if params.upper is None else params.upper
        else:
            lower, upper = HU_PRESETS[params.preset].lower, HU_PRESETS[params.preset].upper
        if lower != -INF and upper != INF:
            mask = (image >= lower) & (image <= upper)
        elif lower != -INF:
            mask = image >= lower
        elif upper != INF:
            mask = image <= upper
        else:
            mask = xp.ones(image.shape, dtype=bool)
    structure = ndi.generate_binary_structure(3, 1)
    if volume.planar:
        structure = plane_of(xp, structure)
    if params.opening_iterations:
        mask = ndi.binary_opening(mask, structure=structure, iterations=params.opening_iterations)
    if params.closing_iterations:
        mask = ndi.binary_closing(mask, structure=structure, iterations=params.closing_iterations)
    if params.fill_holes:
        mask = ndi.binary_fill_holes(mask, structure=structure)
    return mask


def label_counts(xp: ModuleType, labels: Array, count: int) -> np.ndarray:
    """How many voxels hold each label 0..count (a host array), slab by slab: ``bincount``
    of a whole volume would first copy it to intp (8 bytes a voxel)."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    for slab in slabs(len(labels)):
        sizes += to_host(xp.bincount(labels[slab].ravel(), minlength=count + 1))[: count + 1]
    return sizes


def label_moments(
    xp: ModuleType, image: Array, labels: Array, count: int
) -> list[tuple[int, float, float, float, float]]:
    """(voxels, mean, standard deviation, min, max) of ``image`` in each label 1..count.

    Slab by slab in float64, in two passes (the sums, then the squared deviations from
    the mean): the temporaries are a slab's whatever the volume, and the deviation is as
    exact as numpy's ``std`` of the gathered voxels. A few labels gather their voxels
    (a pass each); many go through ``bincount`` and ``ndimage`` over the labelled voxels.
    """
    voxels = np.zeros(count + 1, dtype=np.int64)
    sums = np.zeros(count + 1)
    low = np.full(count + 1, np.inf)
    high = np.full(count + 1, -np.inf)
    for slab in slabs(len(image)):
        for label, values in _labelled_values(xp, image[slab], labels[slab], count):
            voxels[label] += values.size
            sums[label] += float(values.sum(dtype=xp.float64))
            low[label] = min(low[label], float(values.min()))
            high[label] = max(high[label], float(values.max()))
    means = np.divide(sums, voxels, out=np.zeros(count + 1), where=voxels > 0)
    squares = np.zeros(count + 1)
    for slab in slabs(len(image)):
        for label, values in _labelled_values(xp, image[slab], labels[slab], count):
            deviations = values.astype(xp.float64) - means[label]
            squares[label] += float((deviations * deviations).sum())
    rows: list[tuple[int, float, float, float, float]] = []
    for label in range(1, count + 1):
        n = int(voxels[label])
        if n == 0:
            rows.append((0, 0.0, 0.0, 0.0, 0.0))
            continue
        std = float(np.sqrt(squares[label] / n))
        rows.append((n, float(means[label]), std, float(low[label]), float(high[label])))
    return rows


def _labelled_values(
    xp: ModuleType, image: Array, labels: Array, count: int
) -> list[tuple[int, Array]]:
    """Each label of 1..count present in this slab, with its voxels' values."""
    if count <= 8:
        found = [(label, image[labels == label]) for label in range(1, count + 1)]
        return [(label, values) for label, values in found if values.size]
    inside = labels > 0
    flat_labels = labels[inside]
    values = image[inside]
    order = xp.argsort(flat_labels, kind="stable")
    flat_labels, values = flat_labels[order], values[order]
    present = to_host(xp.unique(flat_labels))
    starts = to_host(xp.searchsorted(flat_labels, xp.asarray(present), side="left"))
    ends = to_host(xp.searchsorted(flat_labels, xp.asarray(present), side="right"))
    return [
        (int(label), values[int(start) : int(end)])
        for label, start, end in zip(present, starts, ends, strict=True)
        if 1 <= int(label) <= count
    ]


def segment_statistics(
    xp: ModuleType,
    image: Array,
    labels: Array,
    count: int,
    voxel_mm3: float,
    unit: Code,
    size: tuple[Code, Code, float] | None = None,
) -> list[Measurement]:
    """Volume, mean, standard deviation, min and max of ``image`` inside each segment;
    ``size`` (``Volume.region_size``) replaces the volume in mm3 (a 2-D region's area)."""
    if count == 0:
        return []
    concept, size_unit, per_voxel = size or (Codes.VOLUME, Units.MM3, voxel_mm3)
    rows = label_moments(xp, image, labels, count)
    out: list[Measurement] = []
    for segment, (voxels, mean, std, low, high) in enumerate(rows, start=1):
        if voxels == 0:
            continue
        out += [
            Measurement(concept, voxels * per_voxel, size_unit, segment),
            Measurement(Codes.MEAN, mean, unit, segment),
            Measurement(Codes.STANDARD_DEVIATION, std, unit, segment),
            Measurement(Codes.MINIMUM, low, unit, segment),
            Measurement(Codes.MAXIMUM, high, unit, segment),
        ]
    return out


def intensity_unit(volume: Volume) -> Code:
    return Units.HU if volume.modality == "CT" else Units.NO_UNITS


class ThresholdSegment:
    """A body mask (``body_mask``), HU presets (bone, lung, air), a custom range or Otsu;
    morphology; components.

    Reference: the same steps with ``scipy.ndimage`` / ``skimage.filters.threshold_otsu``;
    the body mask, outlines drawn by hand on real CTs (``tests/data/README.md``).
    """

    name: ClassVar[str] = "threshold_segment"
    version: ClassVar[str] = "2.0.0"
    family: ClassVar[str] = "segment"
    Params: ClassVar[type[ThresholdParams]] = ThresholdParams
    accepts: ClassVar[Accepts] = EVERY_GREY_IMAGE

    def run(self, volume: Volume, params: ThresholdParams, xp: ModuleType) -> list[Result]:
        image = volume.array
        mask = segment_mask(xp, volume, params)
        labels, count = keep_components(
            xp,
            mask,
            params.connectivity,
            params.keep_largest,
            params.min_size_voxels,
            params.separate_components,
            planar=volume.planar,
        )
        preset = HU_PRESETS.get(params.preset)
        category = preset.category if preset else Codes.TISSUE
        kind = preset.type if preset else Codes.TISSUE
        base_name = params.segment_name or params.preset
        segments = tuple(
            SegmentDescription(
                label,
                base_name if count == 1 else f"{base_name} {label}",
                category,
                kind,
            )
            for label in range(1, count + 1)
        )
        stats = segment_statistics(
            xp,
            image,
            labels,
            count,
            volume.voxel_volume_mm3,
            intensity_unit(volume),
            volume.region_size(),
        )
        return [
            LabelResult(labels, segments, volume, f"Threshold segmentation ({params.preset})"),
            MeasurementResult(tuple(stats), description="Segment statistics"),
        ]
