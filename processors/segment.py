"""Threshold segmentation: HU presets or Otsu, morphology, connected components.

Returns a LabelResult (one segment, or one per kept component) and a MeasurementResult
with each segment's volume and intensity statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from processors.backend import ndimage_for, to_host
from processors.base import (
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

HU_PRESETS: dict[str, HUPreset] = {
    "body": HUPreset(-500.0, INF, Codes.ANATOMICAL_STRUCTURE, Codes.ENTIRE_BODY),
    "bone": HUPreset(300.0, INF, Codes.TISSUE, Codes.BONE),
    "lung": HUPreset(-950.0, -500.0, Codes.ANATOMICAL_STRUCTURE, Codes.LUNG),
    "air": HUPreset(-INF, -950.0, Codes.PHYSICAL_OBJECT, Codes.AIR),
}


class ThresholdParams(ProcessorParams):
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


def keep_components(
    xp: ModuleType,
    mask: Array,
    connectivity: int,
    keep_largest: int | None,
    min_size: int,
    separate: bool,
) -> tuple[Array, int]:
    """Label the mask's components and keep the k largest at least ``min_size`` big.

    Returns (labels, count): labels 1..count by decreasing size when ``separate``, else a
    0/1 map. Ties in size keep the lower component index (scipy's labelling order).
    """
    ndi = ndimage_for(xp)
    structure = ndi.generate_binary_structure(3, connectivity)
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


def segment_mask(xp: ModuleType, image: Array, params: ThresholdParams) -> Array:
    """The thresholded, morphologically cleaned mask (before component selection)."""
    ndi = ndimage_for(xp)
    if params.preset == "otsu":
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
    if params.opening_iterations:
        mask = ndi.binary_opening(mask, structure=structure, iterations=params.opening_iterations)
    if params.closing_iterations:
        mask = ndi.binary_closing(mask, structure=structure, iterations=params.closing_iterations)
    if params.fill_holes:
        mask = ndi.binary_fill_holes(mask, structure=structure)
    return mask


def segment_statistics(
    xp: ModuleType, image: Array, labels: Array, count: int, voxel_mm3: float, unit: Code
) -> list[Measurement]:
    """Volume, mean, standard deviation, min and max of ``image`` inside each segment."""
    if count == 0:
        return []
    rows: list[tuple[int, float, float, float, float]] = []
    if count <= 8:
        # A few segments: gather each one's voxels (a handful of passes, no sorting).
        for label in range(1, count + 1):
            values = image[labels == label]
            if values.size == 0:
                rows.append((0, 0.0, 0.0, 0.0, 0.0))
                continue
            mean = float(values.mean())
            std = float(values.std())
            rows.append((int(values.size), mean, std, float(values.min()), float(values.max())))
    else:
        ndi = ndimage_for(xp)
        index = xp.arange(1, count + 1)
        flat_labels = labels.ravel().astype(xp.int64)
        flat = image.ravel().astype(xp.float64)
        n = to_host(xp.bincount(flat_labels, minlength=count + 1)[1:])
        sums = to_host(xp.bincount(flat_labels, weights=flat, minlength=count + 1)[1:])
        squares = to_host(xp.bincount(flat_labels, weights=flat * flat, minlength=count + 1)[1:])
        minima = to_host(xp.asarray(ndi.minimum(image, labels, index)))
        maxima = to_host(xp.asarray(ndi.maximum(image, labels, index)))
        for i in range(count):
            voxels = int(n[i])
            mean = float(sums[i]) / voxels if voxels else 0.0
            var = max(float(squares[i]) / voxels - mean * mean, 0.0) if voxels else 0.0
            rows.append((voxels, mean, var**0.5, float(minima[i]), float(maxima[i])))
    out: list[Measurement] = []
    for segment, (voxels, mean, std, low, high) in enumerate(rows, start=1):
        if voxels == 0:
            continue
        out += [
            Measurement(Codes.VOLUME, voxels * voxel_mm3, Units.MM3, segment),
            Measurement(Codes.MEAN, mean, unit, segment),
            Measurement(Codes.STANDARD_DEVIATION, std, unit, segment),
            Measurement(Codes.MINIMUM, low, unit, segment),
            Measurement(Codes.MAXIMUM, high, unit, segment),
        ]
    return out


def intensity_unit(volume: Volume) -> Code:
    return Units.HU if volume.modality == "CT" else Units.NO_UNITS


class ThresholdSegment:
    """HU presets (body, bone, lung, air), a custom range or Otsu; morphology; components.

    Reference: the same steps with ``scipy.ndimage`` / ``skimage.filters.threshold_otsu``.
    """

    name: ClassVar[str] = "threshold_segment"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "segment"
    Params: ClassVar[type[ThresholdParams]] = ThresholdParams

    def run(self, volume: Volume, params: ThresholdParams, xp: ModuleType) -> list[Result]:
        image = volume.array
        mask = segment_mask(xp, image, params)
        labels, count = keep_components(
            xp,
            mask,
            params.connectivity,
            params.keep_largest,
            params.min_size_voxels,
            params.separate_components,
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
            xp, image, labels, count, volume.voxel_volume_mm3, intensity_unit(volume)
        )
        return [
            LabelResult(labels, segments, volume, f"Threshold segmentation ({params.preset})"),
            MeasurementResult(tuple(stats), description="Segment statistics"),
        ]
