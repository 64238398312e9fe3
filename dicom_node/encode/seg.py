"""``LabelResult`` -> DICOM Segmentation (highdicom), BINARY or FRACTIONAL.

One segment per ``SegmentDescription`` with its coded category and type, the algorithm
identification (processor name, version, family and parameters) on every segment, empty
frames omitted, references to the source instances, the source study, and deterministic
Series/SOP Instance UIDs (``dicom_node.encode.uids``).

BINARY, not LABELMAP: the Label Map Segmentation SOP class is not read by most PACS and
viewers yet, nor by the ``dciodvfy`` Debian ships (see docs/outputs.md). A label map whose
values are floats in 0..1 with exactly one segment is a probability map: FRACTIONAL.
The transfer syntax is Explicit VR Little Endian: BINARY frames are 1 bit per pixel, so
they are already 8x smaller than bytes, and every PACS and validator reads it.

Segment numbers in a SEG run 1..N; labels that skip values (a k-means class that came
out empty) are renumbered in label order, and ``SegEncoding.segment_numbers`` maps each
label to its segment number for the SR that references them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pack_bits
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.encode.common import (
    EncodeError,
    coded,
    coding_schemes,
    input_key,
    long_string,
    ordered_sources,
    output_identity,
    refused_by_highdicom,
)
from dicom_node.encode.frames_seg import (
    expand_to_frames,
    frame_references,
    needs_frame_by_frame,
    stand_in,
)
from dicom_node.encode.slide_derived import write_with_pixel_data
from dicom_node.encode.uids import MANUFACTURER, Provenance
from dicom_node.label_file import release
from dicom_node.security.keys import KeyRing
from dicom_node.slide import is_slide
from processors.base import LabelResult

#: highdicom's default MaximumFractionalValue (FRACTIONAL frames are 8-bit).
MAX_FRACTION = 255

#: processors.base family -> CID 7162 (Surface Processing Algorithm Families) code.
FAMILY_CODES: dict[str, Any] = {
    "segment": codes.cid7162.MorphologicalOperations,
    "cluster": codes.cid7162.ClusterAnalysis,
    "model": codes.cid7162.ArtificialIntelligence,
    "predict": codes.cid7162.ArtificialIntelligence,
    "denoise": codes.cid7162.AdaptiveFiltering,
    "enhance": codes.cid7162.HistogramAnalysis,
    "features": codes.cid7162.NeighborhoodAnalysis,
}


def algorithm_identification(provenance: Provenance) -> hd.AlgorithmIdentificationSequence:
    family = FAMILY_CODES.get(provenance.family, codes.cid7162.ArtificialIntelligence)
    parameters = provenance.parameters_text()
    return hd.AlgorithmIdentificationSequence(
        name=long_string(provenance.processor),
        family=family,
        version=long_string(provenance.version),
        source=MANUFACTURER,
        parameters=parameters or None,
    )


@dataclass(frozen=True)
class SegEncoding:
    """The SEG and which segment number each label became.

    A whole slide's SEG comes without its per-frame functional groups and Pixel Data:
    ``frame_items`` yields the one a frame at a time, ``frames`` the other (``pixel_bytes``
    in all), for ``write_streamed`` to write after the header.
    """

    dataset: hd.seg.Segmentation
    segment_numbers: dict[int, int]
    frames: Callable[[], Iterator[bytes]] | None = None
    pixel_bytes: int = 0
    frame_items: Callable[[], Iterator[Dataset]] | None = None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def write_streamed(encoding: SegEncoding, path: Path, keys: KeyRing | None) -> Path:
    """Write a SEG that comes a frame at a time (``SegEncoding.frames``) to ``path``."""
    if encoding.frames is None or encoding.frame_items is None:
        raise ValueError("this SEG holds its frames: write it as a dataset")
    return write_with_pixel_data(
        path,
        encoding.dataset,
        b"OB",
        encoding.pixel_bytes,
        encoding.frames(),
        keys,
        per_frame_items=encoding.frame_items(),
    )


def _frame_order(labels: npt.NDArray[Any], frame_numbers: Sequence[int]) -> npt.NDArray[Any]:
    """Slices (in position order) rearranged into the source's frame order."""
    out = np.empty_like(labels)
    out[np.asarray(frame_numbers, dtype=np.intp) - 1] = labels
    return out


def _binary_array(result: LabelResult) -> tuple[npt.NDArray[Any], dict[int, int]]:
    """The label map with values = segment numbers 1..N (other values become 0)."""
    labels = np.asarray(result.labels)
    if labels.dtype.kind not in "iub":
        raise EncodeError(f"a label map holds integers, not {labels.dtype}")
    values = sorted(s.label for s in result.segments)
    numbers = {label: number for number, label in enumerate(values, start=1)}
    dtype = np.uint8 if len(values) < 256 else np.uint16
    if values == list(range(1, len(values) + 1)) and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low >= 0 and high <= len(values):
            return labels.astype(dtype, copy=False), numbers
    top = max(int(labels.max()) if labels.size else 0, values[-1])
    if int(labels.min() if labels.size else 0) < 0:
        raise EncodeError("a label map has no negative values")
    table = np.zeros(top + 1, dtype=dtype)
    for label, number in numbers.items():
        table[label] = number
    return table[labels], numbers


def encode_seg(
    result: LabelResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    index: int = 0,
    workers: int = 0,
    whole_slide_in_memory: bool = False,
) -> SegEncoding:
    """The DICOM SEG of ``result`` over the source series ``sources`` (any order).

    ``index`` tells apart several SEGs from one processor run (it enters the UIDs). A
    whole slide's BINARY SEG is made a tile at a time (``streamed_slide_seg``) unless
    ``whole_slide_in_memory``: highdicom's from the whole label map, the same file.
    """
    if not result.segments:
        raise EncodeError("a segmentation without segments has nothing to encode")
    geometry = result.geometry
    ordered = ordered_sources(geometry, sources)
    key = input_key(geometry, sources)
    labels = np.asarray(result.labels)
    if labels.dtype.kind == "f":
        if len(result.segments) != 1:
            raise EncodeError("a probability map (float labels) describes exactly one segment")
        if labels.size and (float(labels.min()) < 0.0 or float(labels.max()) > 1.0):
            raise EncodeError("a probability map holds values within 0..1")
        array: npt.NDArray[Any] = labels.astype(np.float32, copy=False)
        numbers = {result.segments[0].label: 1}
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
        streamable = False
    else:
        seg_type = hd.seg.SegmentationTypeValues.BINARY
        streamable = not whole_slide_in_memory and is_slide(ordered[0])
        streamable = streamable and labels.dtype.kind in "iu"
        streamable = streamable and not geometry.source_frame_numbers
        if streamable:  # read a tile at a time, never whole
            array = labels
            values = sorted(s.label for s in result.segments)
            numbers = {label: number for number, label in enumerate(values, start=1)}
        else:
            array, numbers = _binary_array(result)
    if geometry.source_frame_numbers:
        array = _frame_order(array, geometry.source_frame_numbers)
    # Frames without a frame of reference (a cine loop): highdicom segments a one-frame
    # stand-in, and ``frames_seg`` repeats it for every source frame.
    frame_by_frame = geometry.planar and needs_frame_by_frame(ordered)
    built_on, built_array = ordered, array
    if frame_by_frame:
        built_on = [stand_in(ordered[0])]
        built_array = np.zeros((1, *array.shape[1:]), dtype=array.dtype)

    algorithm = algorithm_identification(provenance)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=numbers[segment.label],
            segment_label=long_string(segment.name),
            segmented_property_category=coded(segment.category),
            segmented_property_type=coded(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues(segment.algorithm_type.value),
            algorithm_identification=algorithm,
            tracking_uid=provenance.instance_uid(key, "seg-segment", index, segment.label),
            tracking_id=long_string(f"{provenance.processor} {segment.name}"),
        )
        for segment in sorted(result.segments, key=lambda s: s.label)
    ]
    used = [c for s in result.segments for c in (s.category, s.type)]
    description = result.description or f"{provenance.processor} segmentation"

    def make(on: Sequence[Dataset], pixels: npt.NDArray[Any], **tiling: Any) -> hd.seg.Segmentation:
        try:
            return hd.seg.Segmentation(
                source_images=on,
                pixel_array=pixels,
                segmentation_type=seg_type,
                segment_descriptions=descriptions,
                **output_identity(provenance, "seg", key, index),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                omit_empty_frames=not frame_by_frame,
                content_description=long_string(description),
                content_label="SEGMENTATION",
                series_description=long_string(f"SEG {description}"),
                coding_schemes=coding_schemes(used) or None,
                max_fractional_value=MAX_FRACTION,
                workers=workers,
                **tiling,
            )
        # AttributeError: highdicom reads a Type 2 element the source lacks (PatientID).
        except (ValueError, TypeError, AttributeError) as exc:
            raise refused_by_highdicom("the segmentation", exc) from exc

    # A whole-slide source: the label map is its total pixel matrix, tiled as the source;
    # a BINARY one is written a tile at a time (``streamed_slide_seg``).
    streamed = streamed_slide_seg(labels, ordered[0], numbers, make) if streamable else None
    if streamed is not None:
        seg = streamed.dataset
    elif is_slide(ordered[0]):
        if streamable:  # highdicom's way after all: the whole array
            array, numbers = _binary_array(result)
        tile = (int(ordered[0].Rows), int(ordered[0].Columns))
        seg = make(ordered, array, tile_pixel_array=True, tile_size=tile)
    else:
        seg = make(built_on, built_array)
    if frame_by_frame:
        try:
            references = frame_references(ordered, array.shape[0])
            expand_to_frames(seg, array, references, sorted(numbers.values()), MAX_FRACTION)
        # AttributeError: highdicom's one-frame SEG lacks what it is expected to have.
        except (ValueError, AttributeError) as exc:
            raise EncodeError(f"the SEG of {array.shape[0]} frames: {exc}") from exc
    if geometry.planar and "ImagePositionPatient" not in ordered[0]:
        # General Image's Patient Orientation (Type 2C) where no plane position places
        # the frame: the source's, or empty.
        seg.PatientOrientation = ordered[0].get("PatientOrientation", "")
    return streamed or SegEncoding(seg, numbers)


def _tile_of(
    labels: npt.NDArray[Any], top: int, left: int, tile: tuple[int, int]
) -> npt.NDArray[Any]:
    """The tile at (top, left) of a (1, rows, columns) label map, padded with 0 past the
    matrix (``highdicom.utils.get_tile_array``), copied out of the map."""
    block = np.asarray(labels[0, top : top + tile[0], left : left + tile[1]])
    out = np.zeros(tile, dtype=block.dtype)
    out[: block.shape[0], : block.shape[1]] = block
    release(labels)
    return out


def streamed_slide_seg(
    labels: npt.NDArray[Any],
    source: Dataset,
    numbers: dict[int, int],
    make: Callable[..., hd.seg.Segmentation],
) -> SegEncoding | None:
    """A whole slide's BINARY SEG without the label map or the Pixel Data in memory, or
    None where it cannot be made so (a tile whose pixels are not a whole number of bytes,
    more segments than a tile has pixels, nothing segmented): highdicom's then.

    highdicom builds the SEG for a stand-in source (the slide's header, its total pixel
    matrix one tile) and a one-tile label map holding every segment, so that the segment
    descriptions, dimensions, functional groups and references are its own; then the
    slide's matrix size, one per-frame item per frame as highdicom makes them for a
    TILED_SPARSE SEG (segment by segment, the tiles holding it in TILED_FULL order, the
    tile's position and its dimension indices among the tiles kept), and the frames,
    packed 1 bit a pixel, a tile at a time when written (``SegEncoding.frames``).
    """
    tile = (int(source.Rows), int(source.Columns))
    pixels_per_tile = tile[0] * tile[1]
    count = len(numbers)
    if pixels_per_tile % 8 or count > pixels_per_tile or not count:
        return None
    _, rows, columns = labels.shape
    origin = source.TotalPixelMatrixOriginSequence[0]
    shared = source.SharedFunctionalGroupsSequence[0]
    placed = hd.spatial.compute_tile_positions_per_frame(
        rows=tile[0],
        columns=tile[1],
        total_pixel_matrix_rows=rows,
        total_pixel_matrix_columns=columns,
        total_pixel_matrix_image_position=[
            origin.XOffsetInSlideCoordinateSystem,
            origin.YOffsetInSlideCoordinateSystem,
            origin.get("ZOffsetInSlideCoordinateSystem", 0.0),
        ],
        image_orientation=source.ImageOrientationSlide,
        pixel_spacing=shared.PixelMeasuresSequence[0].PixelSpacing,
    )
    corners = [(int(r) - 1, int(c) - 1) for (c, r), _ in placed]  # 0-based (top, left)
    found = [np.unique(_tile_of(labels, top, left, tile)) for top, left in corners]
    if min(int(f[0]) for f in found) < 0:
        raise EncodeError("a label map has no negative values")
    table = np.zeros(max(max(int(f[-1]) for f in found), *numbers) + 1, dtype=np.uint16)
    for label, number in numbers.items():
        table[label] = number
    held = [frozenset(int(n) for n in table[f] if n) for f in found]
    kept = [i for i, segments in enumerate(held) if segments]
    if not kept:  # highdicom keeps every frame of an empty map
        return None

    stand_in_source = copy.deepcopy(source)
    stand_in_source.TotalPixelMatrixRows, stand_in_source.TotalPixelMatrixColumns = tile
    stand_in_source.NumberOfFrames = 1
    every = np.arange(pixels_per_tile) % count + 1
    stand_in_map = every.reshape(1, *tile).astype(np.uint8 if count < 256 else np.uint16)
    seg = make([stand_in_source], stand_in_map, tile_pixel_array=True, tile_size=tile)
    # One item per segment, in segment order (with one segment, highdicom identifies it
    # in the shared functional groups instead).
    templates = dict(
        zip(sorted(numbers.values()), seg.PerFrameFunctionalGroupsSequence, strict=True)
    )
    row_index = {r: n for n, r in enumerate(sorted({corners[i][0] for i in kept}), start=1)}
    column_index = {c: n for n, c in enumerate(sorted({corners[i][1] for i in kept}), start=1)}
    frames = [(n, i) for n in sorted(numbers.values()) for i in kept if n in held[i]]

    def frame_items() -> Iterator[Dataset]:
        for number, i in frames:
            top, left = corners[i]
            item = copy.deepcopy(templates[number])
            item.FrameContentSequence[0].DimensionIndexValues = [
                number,
                row_index[top],
                column_index[left],
            ]
            offsets, coordinates = placed[i]
            item.PlanePositionSlideSequence = hd.PlanePositionSequence(
                hd.CoordinateSystemNames.SLIDE,
                image_position=coordinates,
                pixel_matrix_position=(int(offsets[0]), int(offsets[1])),
            )
            yield item

    del seg.PerFrameFunctionalGroupsSequence
    seg.NumberOfFrames = len(frames)
    seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns = rows, columns
    del seg.PixelData
    frame_bytes = pixels_per_tile // 8
    total = frame_bytes * len(frames)
    padding = b"0" if total % 2 else b""  # as highdicom pads an odd length

    def pixel_frames() -> Iterator[bytes]:
        for number, i in frames:
            top, left = corners[i]
            yield pack_bits((table[_tile_of(labels, top, left, tile)] == number).ravel(), pad=False)
        if padding:
            yield padding

    return SegEncoding(seg, numbers, pixel_frames, total + len(padding), frame_items)
