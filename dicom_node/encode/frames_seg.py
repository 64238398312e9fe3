"""The SEG of 2-D frames without a frame of reference: a cine loop, a multi-frame US or XA,
single-frame images of one series.

highdicom (0.28.2, and its master as of 2026-08, issue ImagingDataCommons/highdicom#284)
builds a SEG over source images without a frame of reference only for one source frame:
its dimension index is then the segment number alone, and it refuses several source
frames ("Only a single frame is supported when the source image has no Frame of Reference
UID"), and a source of a multi-frame IOD even with one frame (it reads the functional
groups an old-style multi-frame US lacks). Without a frame of reference, what ties a SEG
frame to its source frame is the frame-level reference in its DerivationImageSequence
(PS3.3 A.51.5.1: same size, pixel for pixel), which a reader matches on.

So the SEG is built as highdicom builds that one-frame SEG, on a single-frame stand-in of
the first source (its header as Secondary Capture, no NumberOfFrames), with one frame per
segment; then each per-frame functional group item is repeated for every source frame
with its own reference (ReferencedSOPInstanceUID and, for a multi-frame source,
ReferencedFrameNumber, with the source's own SOP class), the frames that hold nothing are
left out (all kept when every frame is empty, as highdicom does), and the pixel data is
the frames of every source frame, packed as highdicom packs them (1 bit per pixel for
BINARY, 8-bit fractions for FRACTIONAL). The dimension index stays the segment number:
several frames share a value, and the frame references tell them apart.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence as DicomSequence

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: What highdicom does not carry over from a source to a SEG, or would read as frames.
NOT_IN_STAND_IN = (
    "PixelData",
    "NumberOfFrames",
    "FrameIncrementPointer",
    "FrameTime",
    "FrameTimeVector",
)


def needs_frame_by_frame(sources: Sequence[Dataset]) -> bool:
    """True when highdicom cannot segment these sources itself: no coordinate system
    (no frame of reference with plane positions) and more than one source frame, or a
    source of a multi-frame IOD (NumberOfFrames is Type 1 there)."""
    if not sources or hd.spatial.get_image_coordinate_system(sources[0]) is not None:
        return False
    return len(sources) > 1 or "NumberOfFrames" in sources[0]


def stand_in(source: Dataset) -> Dataset:
    """``source``'s header as one single-frame Secondary Capture image, for highdicom."""
    single = Dataset()
    for element in source:
        if element.keyword not in NOT_IN_STAND_IN:
            single.add(copy.deepcopy(element))
    single.SOPClassUID = SECONDARY_CAPTURE
    return single


def frame_references(ordered: Sequence[Dataset], count: int) -> list[tuple[Dataset, int | None]]:
    """(source dataset, frame number or None) of each of ``count`` frames in source order:
    frames 1..count of one multi-frame instance, or one single-frame instance each."""
    if "NumberOfFrames" in ordered[0]:
        return [(ordered[0], number) for number in range(1, count + 1)]
    if len(ordered) != count:
        raise ValueError(f"{len(ordered)} source instances for {count} frames")
    return [(ds, None) for ds in ordered]


def _pack(frames: list[npt.NDArray[Any]], fractional: bool) -> bytes:
    stacked = np.stack(frames) if frames else np.zeros((0, 0, 0), dtype=np.uint8)
    if fractional:
        data = stacked.astype(np.uint8).tobytes()
        return data + b"\x00" if len(data) % 2 else data
    packed: bytes = pack_bits(stacked.astype(np.uint8), pad=True)
    return packed


def expand_to_frames(
    seg: Dataset,
    array: npt.NDArray[Any],
    references: Sequence[tuple[Dataset, int | None]],
    segment_numbers: Sequence[int],
    max_fractional_value: int,
) -> None:
    """Turn ``seg``, built by highdicom on one stand-in frame with a frame per segment,
    into the SEG of every frame of ``array`` (frames x rows x columns: segment numbers for
    BINARY, 0..1 for FRACTIONAL with one segment), in place."""
    fractional = str(seg.SegmentationType) == "FRACTIONAL"
    template = {_segment_number(seg, item): item for item in seg.PerFrameFunctionalGroupsSequence}
    missing = [number for number in segment_numbers if number not in template]
    if missing:
        raise ValueError(f"highdicom wrote no frame for segment(s) {missing}")

    def frame_of(z: int, number: int) -> npt.NDArray[Any]:
        plane = np.asarray(array[z])
        if fractional:
            return np.rint(plane * float(max_fractional_value)).astype(np.uint8)
        mask: npt.NDArray[np.uint8] = np.equal(plane, number).astype(np.uint8)
        return mask

    planned = [(z, number) for z in range(len(references)) for number in segment_numbers]
    nonempty = [(z, n) for z, n in planned if np.any(frame_of(z, n))]
    chosen = nonempty or planned
    items = [_item(template[n], *references[z]) for z, n in chosen]
    seg.PerFrameFunctionalGroupsSequence = DicomSequence(items)
    seg.NumberOfFrames = len(chosen)
    seg.PixelData = _pack([frame_of(z, n) for z, n in chosen], fractional)
    _reference_instances(seg, [source for source, _ in references])


def _segment_number(seg: Dataset, item: Dataset) -> int:
    """The segment of a per-frame item (in the shared groups when there is one segment)."""
    where = (
        item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
    )
    return int(where.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def _item(template: Dataset, source: Dataset, frame: int | None) -> Dataset:
    item = copy.deepcopy(template)
    reference = item.DerivationImageSequence[0].SourceImageSequence[0]
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        reference.ReferencedFrameNumber = frame
    return item


def _reference_instances(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """The Referenced Series Sequence: each source instance once, with its SOP class."""
    instances: dict[str, Dataset] = {}
    for source in sources:
        uid = str(source.SOPInstanceUID)
        if uid not in instances:
            item = Dataset()
            item.ReferencedSOPClassUID = source.SOPClassUID
            item.ReferencedSOPInstanceUID = uid
            instances[uid] = item
    series = seg.ReferencedSeriesSequence[0]
    series.ReferencedInstanceSequence = DicomSequence(list(instances.values()))
