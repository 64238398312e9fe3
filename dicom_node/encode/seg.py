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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
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
from dicom_node.encode.uids import MANUFACTURER, Provenance
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
    """The SEG and which segment number each label became."""

    dataset: hd.seg.Segmentation
    segment_numbers: dict[int, int]

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


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
) -> SegEncoding:
    """The DICOM SEG of ``result`` over the source series ``sources`` (any order).

    ``index`` tells apart several SEGs from one processor run (it enters the UIDs).
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
    else:
        array, numbers = _binary_array(result)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
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
    # A whole-slide source: the label map is its total pixel matrix, tiled as the source.
    tiled = is_slide(ordered[0])
    tiling: dict[str, Any] = (
        {"tile_pixel_array": True, "tile_size": (int(ordered[0].Rows), int(ordered[0].Columns))}
        if tiled
        else {}
    )
    description = result.description or f"{provenance.processor} segmentation"
    try:
        seg = hd.seg.Segmentation(
            source_images=built_on,
            pixel_array=built_array,
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
    return SegEncoding(seg, numbers)
