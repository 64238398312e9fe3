"""A pipeline over a whole-slide image, region by region (``dicom_node.slide``).

The slide is never in memory whole. Each step is a ``Pixels`` source that computes any
region on demand from the step before it:

- neighbourhood filters (mean, median, gaussian, bilateral, nlm, window, clahe) run the
  processor itself on the region grown by a halo (``halo_of``: the filter's reach, or
  CLAHE's kernel) and crop the result back, so that a tile gets what the whole image
  would (the slide's own edges keep the filter's boundary mode). Values that a filter
  estimates from the image are taken once for the slide: NLM's noise sigma from a sample
  of regions; CLAHE's value range (the slide's min..max, not each region's) and its kernel,
  fixed at 1/8 of a region unless given (the whole image's default, 1/8 of it, would be
  1/8 of the slide). With a kernel that divides the region, CLAHE's contextual regions
  fall on the same grid as on the whole slide, and its result is the same.
  Histogram equalisation (a global mapping) and model predictions are refused on a slide.
- ``threshold_segment``: one threshold for the slide (Otsu from the histogram of a sample
  of regions, all of them up to ``SAMPLE_REGIONS``), then per region; on a slide
  ``preset="body"`` means the tissue (darker than the glass on a colour slide, brighter
  than the background on a greyscale one), and the CT presets (bone, lung, air) are
  refused. Opening/closing run with a halo; hole filling within each region.
  Connected components are joined across region borders (a union of the labels that
  touch across each border, solved as a graph): component sizes, ``keep_largest``,
  ``min_size_voxels`` and ``separate_components`` are the slide's, not a tile's.
- ``kmeans``: fitted once on a sample of pixels from the sample regions (CIELAB on
  colour, standardised intensity on grey), then every region is assigned to the nearest
  centre: classes mean the same everywhere on the slide.
- ``features``: first-order statistics accumulated over all regions (two passes; the
  percentiles from the slide's histogram, to within a bin), the region's area in mm2
  from the slide's pixel spacing, texture (GLCM, SIFT, Haar) on ``n_slices``
  representative regions.

Memory: the tile cache (``Slide.cache_tiles``), a region and its halo for each step, the
statistics. A segmentation step's label map is on disk (``label_file``: an unnamed file
in the output folder), written a region at a time and read a tile at a time by the SEG
encoder (``encode.seg``). Outputs: a tiled SEG over the slide's
total pixel matrix, the TID 1500 SR with areas in mm2, and for each filter step a
derived VL Whole Slide Microscopy Image written a band of tiles at a time
(``encode.slide_derived``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dicom_node.encode.common import blank_unparseable_values, input_key
from dicom_node.encode.slide_derived import (
    derived_slide_header,
    stored_tile,
    write_derived_slide,
)
from dicom_node.image import read_image_file
from dicom_node.label_file import disk_label_map, release
from dicom_node.security.keys import KeyRing
from dicom_node.slide import Slide, SlideError, choose_level, is_slide
from processors.api import result_to_host, run_on_backend, volume_to
from processors.backend import Backend, resolve, to_host
from processors.base import (
    LUMA_WEIGHTS,
    Codes,
    ImageResult,
    LabelResult,
    Measurement,
    MeasurementResult,
    ProcessorError,
    Result,
    SegmentDescription,
    Volume,
    accepts_of,
)
from processors.cluster import class_segments, rgb_to_lab
from processors.denoise import estimate_noise_sigma
from processors.features import compute_features, feature_measurements
from processors.segment import HU_PRESETS, intensity_unit

if TYPE_CHECKING:
    from dicom_node.process import OutputRecord, Step

#: Edge of the regions a slide is processed in (pixels).
REGION = 1024
#: Regions whose pixels fit a global threshold or k-means (all of them up to this many).
SAMPLE_REGIONS = 64
#: Pixels k-means is fitted on when the processor's ``sample_size`` does not say.
KMEANS_SAMPLE = 200_000
#: Label steps and the features step run their own tiled code; these filters run as is.
LABEL_STEPS = ("threshold_segment", "kmeans")
MEASUREMENT_STEPS = ("features",)

Array = npt.NDArray[Any]


class Pixels(Protocol):
    """Float32 pixels of any region of the slide, (h, w) or (h, w, 3) for colour."""

    rows: int
    columns: int
    colour: bool

    def region(self, top: int, left: int, height: int, width: int) -> Array: ...


@dataclass
class SlidePixels:
    slide: Slide

    def __post_init__(self) -> None:
        self.rows, self.columns = self.slide.shape
        self.colour = self.slide.colour

    def region(self, top: int, left: int, height: int, width: int) -> Array:
        return self.slide.read_region(top, left, height, width)


def grey(block: Array) -> Array:
    """A colour block's luminance (``processors.base.luminance``), a grey one as is."""
    if block.ndim == 2:
        return block
    return block @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)


def regions(rows: int, columns: int, size: int = REGION) -> Iterator[tuple[int, int, int, int]]:
    """(top, left, height, width) of the regions that tile the slide, in raster order."""
    for top in range(0, rows, size):
        for left in range(0, columns, size):
            yield top, left, min(size, rows - top), min(size, columns - left)


def sample_regions(
    rows: int, columns: int, size: int = REGION, count: int = SAMPLE_REGIONS
) -> list[tuple[int, int, int, int]]:
    """All regions when they are ``count`` or fewer, else ``count`` spread over the slide."""
    every = list(regions(rows, columns, size))
    if len(every) <= count:
        return every
    picks = np.unique(np.linspace(0, len(every) - 1, count).round().astype(int))
    return [every[int(i)] for i in picks]


def halo_of(name: str, params: Any, spacing: tuple[float, float]) -> int | None:
    """How far (pixels) a filter step reaches beyond a pixel, or None when the step has no
    tiled form (a global mapping, a model, a plugin)."""
    finest = min(spacing)
    if name in ("mean", "median"):
        return int(params.size) // 2
    if name == "gaussian":
        return int(float(params.truncate) * float(params.sigma_mm) / finest + 0.5)
    if name == "bilateral":
        return max(2, math.ceil(3.0 * float(params.sigma_spatial_mm) / finest))
    if name == "nlm":
        return int(params.patch_size) // 2 + int(params.patch_distance)
    if name == "window":
        return 0
    if name == "clahe":
        return int(params.kernel_size or REGION // 8)
    return None


def refusal(step: Step, geometry: Volume, region: int = REGION) -> str | None:
    """Why ``step`` cannot run on this slide, or None."""
    accepts = accepts_of(step.processor)
    why = accepts.refusal(step.name, geometry)
    if why is not None:
        return why
    name = step.provenance.processor
    if not accepts.slides:
        return (
            f"{step.name} has no tiled form for a whole-slide image ({accepts.describe()}; "
            "filters, threshold_segment, kmeans and features do)"
        )
    if name in LABEL_STEPS or name in MEASUREMENT_STEPS:
        if name == "threshold_segment" and step.params.preset in ("bone", "lung", "air"):
            return (
                f"{step.name}: preset {step.params.preset!r} is a CT range in HU, not for a "
                "slide (body: the tissue, otsu, or custom)"
            )
        if name == "kmeans" and step.params.spatial_weight > 0:
            return f"{step.name}: spatial_weight is not supported on a slide (set it to 0)"
        return None
    halo = halo_of(name, step.params, (geometry.spacing[1], geometry.spacing[2]))
    if halo is None:
        return (
            f"{step.name} has no tiled form for a whole-slide image (filters, "
            "threshold_segment, kmeans and features do)"
        )
    if halo > region:
        return (
            f"{step.name} reaches {halo} pixels at this slide's spacing "
            f"({geometry.spacing[1]:g} mm), more than a region ({region}): use a smaller size"
        )
    return None


class Filtered:
    """A filter step's output, region by region: its input grown by the halo, the
    processor run on it, the result cropped back."""

    def __init__(
        self,
        upstream: Pixels,
        step: Step,
        params: Any,
        halo: int,
        geometry: Volume,
        backend: Backend,
    ) -> None:
        self.upstream, self.step, self.params, self.halo = upstream, step, params, halo
        self.geometry, self.backend = geometry, backend
        self.rows, self.columns = upstream.rows, upstream.columns
        self.colour = upstream.colour and accepts_of(step.processor).colour

    def region(self, top: int, left: int, height: int, width: int) -> Array:
        y0, x0 = max(0, top - self.halo), max(0, left - self.halo)
        y1 = min(self.rows, top + height + self.halo)
        x1 = min(self.columns, left + width + self.halo)
        block = self.upstream.region(y0, x0, y1 - y0, x1 - x0)
        volume = replace(self.geometry, array=block[None])
        device = volume_to(volume, self.backend)
        results = run_on_backend(self.step.processor, device, self.params, self.backend)
        images = [r for r in results if isinstance(r, ImageResult)]
        if not images:
            raise ProcessorError(f"{self.step.name} returned no image")
        out: Array = np.asarray(to_host(images[0].volume.array), dtype=np.float32)[0]
        return out[top - y0 : top - y0 + height, left - x0 : left - x0 + width]


def _volume(geometry: Volume, block: Array) -> Volume:
    return replace(geometry, array=block[None])


def filter_params(step: Step, upstream: Pixels, geometry: Volume) -> Any:
    """The step's parameters with what the whole image would estimate fixed for the slide."""
    params = step.params
    if step.provenance.processor == "nlm" and params.sigma is None:
        samples = [
            grey(upstream.region(*box))
            for box in sample_regions(upstream.rows, upstream.columns, count=4)
        ]
        sigma = float(np.median([estimate_noise_sigma(s[None], np) for s in samples]))
        return params.model_copy(update={"sigma": sigma})
    if step.provenance.processor == "clahe":
        update: dict[str, Any] = {}
        if params.kernel_size is None:
            update["kernel_size"] = REGION // 8
        if params.value_range is None:  # the slide's range, not each region's
            update["value_range"] = sample_range(upstream)
        return params.model_copy(update=update)
    return params


def sample_range(pixels: Pixels) -> tuple[float, float]:
    """The luminance's min and max over the sample regions (all regions, up to 64)."""
    low, high = math.inf, -math.inf
    for box in sample_regions(pixels.rows, pixels.columns):
        values = grey(pixels.region(*box))
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return (low, high) if high > low else (low, low + 1.0)


# ------------------------------------------------------------------ global thresholds


def otsu(counts: Array, low: float, high: float) -> float:
    """Otsu's threshold from a histogram over (low, high), as ``threshold_otsu`` computes
    it from the pixels (``processors.segment.threshold_otsu``)."""
    if low == high:
        return low
    edges = np.linspace(low, high, len(counts) + 1)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weights = counts.astype(np.float32)
    weight1 = np.cumsum(weights)
    weight2 = np.cumsum(weights[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(weights * centres) / weight1
        mean2 = (np.cumsum((weights * centres)[::-1]) / weight2[::-1])[::-1]
        variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(np.nanargmax(variance))])


def sample_otsu(pixels: Pixels, boxes: Sequence[tuple[int, int, int, int]], bins: int) -> float:
    """Otsu's threshold of the luminance of the ``boxes`` (two passes, no pixels kept)."""
    low, high = math.inf, -math.inf
    for box in boxes:
        values = grey(pixels.region(*box))
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    if low == high:
        return low
    counts = np.zeros(bins, dtype=np.int64)
    for box in boxes:
        counts += np.histogram(grey(pixels.region(*box)), bins=bins, range=(low, high))[0]
    return otsu(counts, low, high)


def tissue(pixels: Pixels, threshold: float, block: Array) -> Array:
    """The tissue of a block: darker than the glass on a colour (brightfield) slide,
    brighter than the background on a greyscale (fluorescence) one."""
    values = grey(block)
    return values < threshold if pixels.colour else values > threshold


# ------------------------------------------------------------------ statistics


class LabelStatistics:
    """Pixels, sum, sum of squares, min and max of the luminance in each label 1..count,
    accumulated region by region (float64)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pixels = np.zeros(count + 1, dtype=np.int64)
        self.sums = np.zeros(count + 1)
        self.squares = np.zeros(count + 1)
        self.low = np.full(count + 1, np.inf)
        self.high = np.full(count + 1, -np.inf)

    def add(self, values: Array, labels: Array) -> None:
        flat_labels = labels.ravel().astype(np.intp)
        flat = values.ravel().astype(np.float64)
        n = self.count + 1
        self.pixels += np.bincount(flat_labels, minlength=n)[:n]
        self.sums += np.bincount(flat_labels, weights=flat, minlength=n)[:n]
        self.squares += np.bincount(flat_labels, weights=flat * flat, minlength=n)[:n]
        present = np.unique(flat_labels)
        present = present[(present > 0) & (present <= self.count)]
        if present.size:
            self.low[present] = np.minimum(
                self.low[present], ndimage.minimum(flat, flat_labels, present)
            )
            self.high[present] = np.maximum(
                self.high[present], ndimage.maximum(flat, flat_labels, present)
            )

    def measurements(self, geometry: Volume) -> list[Measurement]:
        """As ``processors.segment.segment_statistics``: area, mean, std, min, max."""
        concept, unit, per_pixel = geometry.region_size()
        intensity = intensity_unit(geometry)
        out: list[Measurement] = []
        for label in range(1, self.count + 1):
            n = int(self.pixels[label])
            if n == 0:
                continue
            mean = self.sums[label] / n
            std = math.sqrt(max(self.squares[label] / n - mean * mean, 0.0))
            out += [
                Measurement(concept, n * per_pixel, unit, label),
                Measurement(Codes.MEAN, float(mean), intensity, label),
                Measurement(Codes.STANDARD_DEVIATION, std, intensity, label),
                Measurement(Codes.MINIMUM, float(self.low[label]), intensity, label),
                Measurement(Codes.MAXIMUM, float(self.high[label]), intensity, label),
            ]
        return out


# ------------------------------------------------------------------ threshold_segment


def _threshold_range(
    pixels: Pixels, params: Any, boxes: Sequence[tuple[int, int, int, int]]
) -> Callable[[Array], Array]:
    """The slide's inside test on a block (one threshold for the whole slide)."""
    if params.preset in ("body", "otsu"):
        threshold = sample_otsu(pixels, boxes, params.otsu_bins)
        if params.preset == "body":
            return lambda block: tissue(pixels, threshold, block)
        return lambda block: grey(block) > threshold
    lower = -math.inf if params.lower is None else params.lower
    upper = math.inf if params.upper is None else params.upper
    return lambda block: (grey(block) >= lower) & (grey(block) <= upper)


def _mask_region(
    pixels: Pixels, inside: Callable[[Array], Array], params: Any, box: tuple[int, int, int, int]
) -> tuple[Array, Array]:
    """The cleaned mask of a region (opening/closing with a halo, holes within it) and the
    region's luminance."""
    top, left, height, width = box
    reach = 2 * (params.opening_iterations + params.closing_iterations)
    y0, x0 = max(0, top - reach), max(0, left - reach)
    y1, x1 = min(pixels.rows, top + height + reach), min(pixels.columns, left + width + reach)
    block = pixels.region(y0, x0, y1 - y0, x1 - x0)
    mask = inside(block)
    cross = ndimage.generate_binary_structure(2, 1)
    if params.opening_iterations:
        mask = ndimage.binary_opening(mask, cross, iterations=params.opening_iterations)
    if params.closing_iterations:
        mask = ndimage.binary_closing(mask, cross, iterations=params.closing_iterations)
    core = (slice(top - y0, top - y0 + height), slice(left - x0, left - x0 + width))
    mask = mask[core]
    if params.fill_holes:
        mask = ndimage.binary_fill_holes(mask, cross)
    return mask, grey(block)[core]


class SlideComponents:
    """Connected components of a slide's mask, labelled region by region and joined
    across the region borders: provisional labels per region, the pairs that touch across
    each border, then the graph's connected components."""

    def __init__(self, columns: int, connectivity: int) -> None:
        self.structure = ndimage.generate_binary_structure(2, 1 if connectivity == 1 else 2)
        self.diagonal = connectivity > 1
        self.columns = columns
        self.above = np.zeros(columns, dtype=np.int64)  # the row above this row of regions
        self.bottom = np.zeros(columns, dtype=np.int64)  # this row of regions' last row
        self.left_column = np.zeros(0, dtype=np.int64)
        self.sizes: list[Array] = [np.zeros(1, dtype=np.int64)]
        self.edges: list[tuple[Array, Array]] = []
        self.next = 1

    def label(self, mask: Array) -> Array:
        """Provisional labels of a region's mask, numbered after the regions before it."""
        found, count = ndimage.label(mask, self.structure)
        labels: Array = np.asarray(found, dtype=np.int64)
        self.sizes.append(np.bincount(labels.ravel(), minlength=int(count) + 1)[1:])
        labels[labels > 0] += self.next - 1
        self.next += int(count)
        return labels

    def _join(self, a: Array, b: Array) -> None:
        both = (a > 0) & (b > 0)
        if both.any():
            self.edges.append((a[both], b[both]))

    def add(self, box: tuple[int, int, int, int], labels: Array) -> None:
        """Record the pairs of labels that touch across the region's top and left borders
        (with ``connectivity`` > 1, diagonally too)."""
        top, left, _, width = box
        if left == 0 and top > 0:
            self.above = self.bottom.copy()
        if top > 0:
            row, above = labels[0], self.above
            self._join(row, above[left : left + width])
            if self.diagonal:
                self._join(row[1:], above[left : left + width - 1])
                self._join(row[:-1], above[left + 1 : left + width])
                if left > 0:
                    self._join(row[:1], above[left - 1 : left])
                if left + width < self.columns:
                    self._join(row[-1:], above[left + width : left + width + 1])
        if left > 0:
            column, before = labels[:, 0], self.left_column
            self._join(column, before)
            if self.diagonal:
                self._join(column[1:], before[:-1])
                self._join(column[:-1], before[1:])
        self.left_column = labels[:, -1].copy()
        self.bottom[left : left + width] = labels[-1]

    def components(self) -> tuple[Array, Array]:
        """(component of each provisional label, size of each component); label 0 is the
        background and component 0."""
        n = self.next
        sizes = np.concatenate(self.sizes)
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
        _, component = connected_components(graph, directed=False)
        # Renumber so that the background is 0 and components follow their first label.
        first = np.full(component.max() + 1, n, dtype=np.int64)
        np.minimum.at(first, component, np.arange(n))
        order = np.argsort(first)
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        component = rank[component]
        totals = np.bincount(component, weights=sizes, minlength=order.size).astype(np.int64)
        totals[0] = 0
        return component, totals


def _kept(totals: Array, params: Any) -> tuple[Array, int]:
    """The label each component becomes (0: dropped), as ``keep_components``: by
    decreasing size (ties: first found), at least ``min_size_voxels``, the k largest."""
    count = len(totals) - 1
    order = np.argsort(-totals[1:] * (count + 1) + np.arange(1, count + 1), kind="stable") + 1
    keep = totals[order] >= max(params.min_size_voxels, 1)
    if params.keep_largest is not None:
        keep[params.keep_largest :] = False
    kept = order[keep]
    lut = np.zeros(count + 1, dtype=np.int64)
    if params.separate_components:
        lut[kept] = np.arange(1, kept.size + 1)
        return lut, int(kept.size)
    lut[kept] = 1
    return lut, min(int(kept.size), 1)


def threshold_slide(
    pixels: Pixels, params: Any, geometry: Volume, region: int = REGION, scratch: Path | None = None
) -> list[Result]:
    """``threshold_segment`` over the slide: the label map (on disk in ``scratch``,
    ``label_file``) and segment statistics."""
    boxes = sample_regions(pixels.rows, pixels.columns, region)
    inside = _threshold_range(pixels, params, boxes)
    select = params.keep_largest is not None or params.min_size_voxels > 1
    select = select or params.separate_components
    shape = (1, pixels.rows, pixels.columns)
    if not select:  # one pass: the mask is the segment
        labels = disk_label_map(shape, np.uint8, scratch)
        statistics = LabelStatistics(1)
        for box in regions(pixels.rows, pixels.columns, region):
            mask, values = _mask_region(pixels, inside, params, box)
            top, left, height, width = box
            labels[0, top : top + height, left : left + width] = mask
            release(labels)
            statistics.add(values, mask)
        count = int(statistics.pixels[1] > 0)
    else:  # the components, then each region relabelled with the slide's choice of them
        joined = SlideComponents(pixels.columns, params.connectivity)
        for box in regions(pixels.rows, pixels.columns, region):
            mask, _ = _mask_region(pixels, inside, params, box)
            joined.add(box, joined.label(mask))
        component, totals = joined.components()
        kept, count = _kept(totals, params)
        lut = kept[component]
        labels = disk_label_map(shape, np.uint8 if count <= 255 else np.uint16, scratch)
        statistics = LabelStatistics(count)
        replay = SlideComponents(pixels.columns, params.connectivity)
        for box in regions(pixels.rows, pixels.columns, region):
            mask, values = _mask_region(pixels, inside, params, box)
            top, left, height, width = box
            chosen = lut[replay.label(mask)]
            labels[0, top : top + height, left : left + width] = chosen
            release(labels)
            statistics.add(values, chosen)
    preset = HU_PRESETS.get(params.preset) if params.preset != "body" else None
    category = preset.category if preset else Codes.TISSUE
    kind = preset.type if preset else Codes.TISSUE
    base = params.segment_name or ("tissue" if params.preset == "body" else params.preset)
    segments = tuple(
        SegmentDescription(label, base if count == 1 else f"{base} {label}", category, kind)
        for label in range(1, count + 1)
    )
    return [
        LabelResult(labels, segments, geometry, f"Threshold segmentation ({params.preset})"),
        MeasurementResult(
            tuple(statistics.measurements(geometry)), description="Segment statistics"
        ),
    ]


# ------------------------------------------------------------------ kmeans


def kmeans_slide(
    pixels: Pixels, params: Any, geometry: Volume, region: int = REGION, scratch: Path | None = None
) -> list[Result]:
    """``kmeans`` over the slide: fitted on a sample of pixels, then every region assigned
    to the nearest centre (labels ranked by the centres' L* or intensity)."""
    from sklearn.cluster import KMeans

    boxes = sample_regions(pixels.rows, pixels.columns, region)
    threshold = sample_otsu(pixels, boxes, 256) if params.inside_body else None
    size = params.sample_size or KMEANS_SAMPLE
    rng = np.random.default_rng(params.seed)

    def inside_of(block: Array) -> Array | None:
        return None if threshold is None else tissue(pixels, threshold, block)

    def features(block: Array) -> Array:
        if pixels.colour:
            return np.asarray(rgb_to_lab(np, block), dtype=np.float32).reshape(-1, 3)
        return grey(block).reshape(-1, 1)

    chosen: list[Array] = []
    total = sum(box[2] * box[3] for box in boxes)
    for box in boxes:
        block = pixels.region(*box)
        x = features(block)
        inside = inside_of(block)
        if inside is not None:
            x = x[inside.ravel()]
        share = max(1, round(size * (box[2] * box[3]) / total))
        if x.shape[0] > share:
            x = x[np.sort(rng.choice(x.shape[0], share, replace=False))]
        chosen.append(x)
    sample = np.concatenate(chosen)
    if sample.shape[0] < params.k:
        raise ProcessorError(
            f"the slide's sample holds fewer pixels than k={params.k}: nothing to cluster "
            "(inside_body=false clusters the whole slide)"
        )
    if pixels.colour:  # CIELAB as it is: distances are colour differences
        mean, std = np.zeros(3), np.ones(3)
    else:  # standardised intensity, as the whole image's k-means
        mean, std = np.array([float(sample.mean())]), np.array([float(sample.std()) or 1.0])
    model = KMeans(
        n_clusters=params.k,
        max_iter=params.max_iter,
        tol=params.tol,
        n_init=params.n_init,
        random_state=params.seed,
    ).fit((sample - mean) / std)
    centres = np.asarray(model.cluster_centers_, dtype=np.float64)
    order = np.argsort(centres[:, 0])
    rank = np.empty(params.k, dtype=np.int64)
    rank[order] = np.arange(1, params.k + 1)
    labels = disk_label_map((1, pixels.rows, pixels.columns), np.uint8, scratch)
    statistics = LabelStatistics(params.k)
    for box in regions(pixels.rows, pixels.columns, region):
        top, left, height, width = box
        block = pixels.region(*box)
        x = (features(block) - mean) / std
        nearest = np.argmin(
            (x * x).sum(axis=1, keepdims=True) - 2.0 * x @ centres.T + (centres**2).sum(axis=1),
            axis=1,
        )
        assigned = rank[nearest].reshape(height, width).astype(np.uint8)
        inside = inside_of(block)
        if inside is not None:
            assigned *= inside
        labels[0, top : top + height, left : left + width] = assigned
        release(labels)
        statistics.add(grey(block), assigned)
    ordered = (centres[order, 0] * std[0] + mean[0]).tolist()
    present = [label for label in range(1, params.k + 1) if statistics.pixels[label] > 0]
    where = " inside the tissue" if threshold is not None else ""
    return [
        LabelResult(
            labels,
            tuple(class_segments(geometry, ordered, present)),
            geometry,
            f"K-means, {params.k} classes{where}",
        ),
        MeasurementResult(
            tuple(statistics.measurements(geometry)), description="Cluster statistics"
        ),
    ]


# ------------------------------------------------------------------ features


def features_slide(
    pixels: Pixels, params: Any, geometry: Volume, region: int = REGION, scratch: Path | None = None
) -> list[Result]:
    """``features`` over the slide: first-order statistics of all its region pixels, the
    region's area, and texture on ``n_slices`` representative regions."""
    boxes = list(regions(pixels.rows, pixels.columns, region))

    def values_of(box: tuple[int, int, int, int]) -> Array:
        values = grey(pixels.region(*box))
        if params.region_threshold is None:
            return values.ravel()
        inside: Array = values[values > params.region_threshold]
        return inside

    count, total, low, high = 0, 0.0, math.inf, -math.inf
    holding: list[int] = []
    for index, box in enumerate(boxes):
        values = values_of(box)
        if values.size:
            holding.append(index)
            count += int(values.size)
            total += float(values.sum(dtype=np.float64))
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if count == 0:
        raise ProcessorError("the feature region is empty")
    mean = total / count
    m2 = m3 = m4 = 0.0
    bins = params.histogram_bins
    edges = (low, high if high > low else low + 1.0)
    hist = np.zeros(bins, dtype=np.int64)
    for index in holding:
        values = values_of(boxes[index]).astype(np.float64)
        centred = values - mean
        squared = centred * centred
        m2 += float(squared.sum())
        m3 += float((squared * centred).sum())
        m4 += float((squared * squared).sum())
        hist += np.histogram(values, bins=bins, range=edges)[0]
    m2, m3, m4 = m2 / count, m3 / count, m4 / count
    p = hist.astype(np.float64) / count
    nz = p[p > 0]
    first_order = {
        "Mean": mean,
        "Standard Deviation": math.sqrt(m2),
        "Minimum": low,
        "Maximum": high,
        "Median": _histogram_percentile(hist, edges, 50.0),
        "Percentile 10": _histogram_percentile(hist, edges, 10.0),
        "Percentile 90": _histogram_percentile(hist, edges, 90.0),
        "Skewness": m3 / m2**1.5 if m2 > 0 else 0.0,
        "Kurtosis": m4 / m2**2 - 3.0 if m2 > 0 else 0.0,
        "Entropy": float(-(nz * np.log2(nz)).sum()),
        "Uniformity": float((p**2).sum()),
        "Region area": count * geometry.region_size()[2],
    }
    picks = sorted(
        {
            holding[round(i)]
            for i in np.linspace(0, len(holding) - 1, min(params.n_slices, len(holding)))
        }
    )
    texture: dict[str, float] = {}
    one = params.model_copy(update={"n_slices": 1})
    for index in picks:
        block = grey(pixels.region(*boxes[index]))
        found = compute_features(_volume(geometry, block), one, np)
        for name, value in found.items():
            if name not in first_order and name not in ("Region volume",):
                texture[name] = texture.get(name, 0.0) + value / len(picks)
    named = {**first_order, **texture}
    return [MeasurementResult(feature_measurements(named, geometry), description="Image features")]


def _histogram_percentile(hist: Array, edges: tuple[float, float], point: float) -> float:
    """The ``point`` percentile of the values binned in ``hist``, linear within a bin."""
    cumulative = np.cumsum(hist)
    target = point / 100.0 * cumulative[-1]
    index = int(np.searchsorted(cumulative, target))
    index = min(index, len(hist) - 1)
    before = cumulative[index - 1] if index else 0
    width = (edges[1] - edges[0]) / len(hist)
    inside = (target - before) / hist[index] if hist[index] else 0.0
    return float(edges[0] + (index + inside) * width)


# ------------------------------------------------------------------ the pipeline


RUNNERS: dict[str, Callable[[Pixels, Any, Volume, int, Path | None], list[Result]]] = {
    "threshold_segment": threshold_slide,
    "kmeans": kmeans_slide,
    "features": features_slide,
}


def run_slide_steps(
    pixels: Pixels,
    steps: Sequence[Step],
    geometry: Volume,
    backend: Backend,
    on_results: Callable[[int, Step, list[Result], Pixels | None], None],
    region: int = REGION,
    scratch: Path | None = None,
) -> None:
    """Each step in turn: a filter becomes the next step's input (computed region by
    region when asked) and is handed to ``on_results(step_number, step, [], pixels)``; a
    label or measurement step runs over the slide and hands its results
    (``on_results(step_number, step, results, None)``)."""
    current: Pixels = pixels
    for number, step in enumerate(steps, start=1):
        name = step.provenance.processor
        here = replace(geometry, array=_shape_of(geometry, current.colour))
        runner = RUNNERS.get(name)
        if runner is not None:
            results = runner(current, step.params, here, region, scratch)
            stamped = [
                replace(r, processor=name, processor_version=step.provenance.version)
                for r in results
            ]
            on_results(number, step, [result_to_host(r) for r in stamped], None)
            continue
        halo = halo_of(name, step.params, (geometry.spacing[1], geometry.spacing[2]))
        assert halo is not None  # refused before any work otherwise
        params = filter_params(step, current, here)
        current = Filtered(current, step, params, halo, here, backend)
        on_results(number, step, [], current)


def _shape_of(geometry: Volume, colour: bool) -> Array:
    _, rows, columns = geometry.shape
    shape = (1, rows, columns, 3) if colour else (1, rows, columns)
    return np.broadcast_to(np.float32(0), shape)


def process_slide(
    paths: Sequence[Path],
    steps: Sequence[Step],
    output: Path,
    device: str = "cpu",
    problems: list[str] | None = None,
    timings: list[tuple[str, float]] | None = None,
    on_step_written: Callable[[int, list[OutputRecord]], None] | None = None,
    keys: KeyRing | None = None,
    *,
    region: int = REGION,
    cache_tiles: int | None = None,
) -> list[OutputRecord]:
    """``process_series`` for a whole-slide series: the highest-resolution level processed
    region by region, its derived slides, SEG (tiled) and SR written; what was left out
    in ``problems``."""
    from dicom_node.process import encode_results, return_freed_memory_promptly

    return_freed_memory_promptly()
    notes: list[str] = [] if problems is None else problems
    started = time.perf_counter()
    headers = [(path, read_image_file(path, keys, stop_before_pixels=True)) for path in paths]
    choice = choose_level(headers)
    notes += list(choice.ignored)
    options = {} if cache_tiles is None else {"cache_tiles": cache_tiles}
    records: list[OutputRecord] = []
    with Slide(choice.path, keys, **options) as slide:
        if slide.note:
            notes.append(slide.note)
        geometry = slide.geometry()
        for step in steps:
            why = refusal(step, geometry, region)
            if why is not None:
                raise ProcessorError(why)
        sources = [choice.header]
        blanked = blank_unparseable_values(sources)
        if blanked:
            notes.append(f"left empty in the outputs, not a valid value: {', '.join(blanked)}")
        series_uid = geometry.series_instance_uid or "unknown"
        if timings is not None:
            timings.append(("load", time.perf_counter() - started))

        def written(number: int, step: Step, results: list[Result], image: Pixels | None) -> None:
            clock = time.perf_counter()
            folder = output / series_uid / f"{number:02d}-{step.provenance.processor}"
            if image is not None:
                done = [derived_slide(image, slide, step, folder, keys)]
            else:
                done = encode_results(results, sources, geometry, step, folder, notes, keys)
            records.extend(done)
            if timings is not None:
                timings.append((f"{step.name}:run+encode", time.perf_counter() - clock))
            if on_step_written is not None:
                on_step_written(number, done)

        if slide.tile_count == 0:
            raise SlideError("the slide has no tiles")
        output.mkdir(parents=True, exist_ok=True)  # label maps are kept there, unnamed
        run_slide_steps(
            SlidePixels(slide), steps, geometry, resolve(device), written, region, output
        )
    return records


def derived_tiles(
    pixels: Pixels, tile: tuple[int, int], slope: float, region: int = REGION
) -> Iterator[Array]:
    """The stored tiles of ``pixels`` in TILED_FULL order, computed a band of one tile's
    height at a time in regions of about ``region`` columns (edge tiles padded with 0)."""
    tile_rows, tile_columns = tile
    width = max(tile_columns, region // tile_columns * tile_columns)
    for top in range(0, pixels.rows, tile_rows):
        height = min(tile_rows, pixels.rows - top)
        for left in range(0, pixels.columns, width):
            block = pixels.region(top, left, height, min(width, pixels.columns - left))
            for x in range(0, block.shape[1], tile_columns):
                part = block[:, x : x + tile_columns]
                if part.shape[:2] != tile:
                    padded = np.zeros((*tile, *part.shape[2:]), dtype=np.float32)
                    padded[: part.shape[0], : part.shape[1]] = part
                    part = padded
                yield stored_tile(part, pixels.colour, slope)


def derived_slide(
    pixels: Pixels, slide: Slide, step: Step, folder: Path, keys: KeyRing | None
) -> OutputRecord:
    """Write a filter step's output as a derived whole-slide image (``encode.slide_derived``)."""
    from dicom_node.process import OutputRecord

    provenance = step.provenance
    source = slide.header
    unit_range = slide.colour or provenance.family == "enhance"
    slope = 1.0 / 65535.0 if unit_range and not pixels.colour else 1.0
    geometry = slide.geometry()
    header = derived_slide_header(
        source,
        provenance,
        input_key(geometry, [source]),
        index=0,
        description=f"{provenance.processor} output",
        colour=pixels.colour,
        slope=slope,
    )
    path = write_derived_slide(
        folder / "derived-0" / "0001.dcm",
        header,
        derived_tiles(pixels, slide.tile_shape, slope),
        keys,
    )
    return OutputRecord(
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        series_instance_uid=str(header.SeriesInstanceUID),
        kind="derived",
        path=path,
        source_series_uid=str(source.SeriesInstanceUID),
        processor_name=provenance.processor,
        processor_version=provenance.version,
        params=provenance.params_json,
    )


def is_slide_series(paths: Sequence[Path], keys: KeyRing | None = None) -> bool:
    """True when the series' first file is a whole-slide image (its header only is read)."""
    return bool(paths) and is_slide(read_image_file(paths[0], keys, stop_before_pixels=True))
