"""The SEG of frames without a frame of reference (``dicom_node.encode.frames_seg``): a
multi-frame ultrasound and a stack of single-frame images, each SEG frame referencing its
source frame, read back with highdicom and checked with dciodvfy."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from encode_checks import dciodvfy, save
from pydicom.dataset import Dataset

from dicom_node.encode.frames_seg import needs_frame_by_frame
from dicom_node.encode.seg import encode_seg
from dicom_node.encode.uids import Provenance
from dicom_node.image import datasets_to_image, read_image_file
from processors.base import Codes, LabelResult, SegmentDescription, Volume
from tests.dicom_node.test_image import CR, data

US_MULTI_FRAME = "1.2.840.10008.5.1.4.1.1.3.1"
THRESHOLD = Provenance("threshold_segment", "1.0.0", "segment", {"preset": "otsu"})


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return np.asarray((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2)


def segments(*labels: int) -> tuple[SegmentDescription, ...]:
    return tuple(
        SegmentDescription(label, f"region {label}", Codes.TISSUE, Codes.TISSUE) for label in labels
    )


def errors(path: Path) -> set[str]:
    return {line for line in dciodvfy(path) if line.startswith("Error")}


def new_errors(seg_path: Path, *sources: Path) -> set[str]:
    inherited: set[str] = set().union(*(errors(source) for source in sources))
    return errors(seg_path) - inherited


def test_a_multi_frame_ultrasound_gets_one_seg_referencing_each_frame(tmp_path: Path) -> None:
    source_path = data("OBXXXX1A_rle_2frame.dcm")  # US Multi-frame, no frame of reference
    source = read_image_file(source_path)
    image = datasets_to_image([source])
    assert image.source_frame_numbers == (1, 2) and not image.frame_of_reference_uid
    shape = image.shape[1:]
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[0][disc(shape, (300, 400), 80)] = 1
    labels[1][disc(shape, (200, 300), 50)] = 1
    labels[1][disc(shape, (450, 600), 60)] = 2
    result = LabelResult(labels=labels, geometry=image, segments=segments(1, 2))

    encoding = encode_seg(result, [source], THRESHOLD)
    path = save(encoding.dataset, tmp_path / "seg.dcm")
    assert new_errors(path, source_path) == set()
    seg = hd.seg.segread(path)
    # Segment 2 is empty on frame 1: that SEG frame is left out.
    references = [
        (
            int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
            item.DerivationImageSequence[0].SourceImageSequence[0],
        )
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    assert [(number, int(ref.ReferencedFrameNumber)) for number, ref in references] == [
        (1, 1),
        (1, 2),
        (2, 2),
    ]
    for _, reference in references:
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
    listed = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in listed] == [
        (source.SOPClassUID, source.SOPInstanceUID)
    ]
    read = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=[1, 2], combine_segments=True
    )
    assert np.array_equal(read, labels)
    assert "FrameOfReferenceUID" not in seg


def test_a_stack_of_single_frames_gets_one_seg_referencing_each_instance(tmp_path: Path) -> None:
    paths, stack = [], []
    for number in (1, 2, 3):
        ds = pydicom.dcmread(CR)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{number}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        paths.append(save(ds, tmp_path / f"cr{number}.dcm"))
        stack.append(read_image_file(paths[-1]))
    image = datasets_to_image(list(reversed(stack)))  # given in any order
    assert image.shape == (3, 16, 16) and not image.source_frame_numbers
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[0, 2:6, 2:6] = 1
    labels[2, 8:14, 3:9] = 1
    result = LabelResult(labels=labels, geometry=image, segments=segments(1))
    encoding = encode_seg(result, stack, THRESHOLD)
    path = save(encoding.dataset, tmp_path / "seg.dcm")
    assert new_errors(path, *paths) == set()
    seg = hd.seg.segread(path)
    referenced = [
        item.DerivationImageSequence[0].SourceImageSequence[0]
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    assert [r.ReferencedSOPInstanceUID for r in referenced] == [
        stack[0].SOPInstanceUID,
        stack[2].SOPInstanceUID,
    ]
    assert not any("ReferencedFrameNumber" in r for r in referenced)
    listed = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert [i.ReferencedSOPInstanceUID for i in listed] == [ds.SOPInstanceUID for ds in stack]
    read = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in stack],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(read, labels)


def test_a_probability_map_over_a_cine_loop_is_fractional(tmp_path: Path) -> None:
    source_path = data("OBXXXX1A_rle_2frame.dcm")
    source = read_image_file(source_path)
    image = datasets_to_image([source])
    rows = np.linspace(0.0, 1.0, image.shape[1], dtype=np.float32)[:, None]
    probability = np.broadcast_to(rows, image.shape[1:])
    labels = np.stack([probability, np.zeros_like(probability)])
    result = LabelResult(labels=labels, geometry=image, segments=segments(1))
    path = save(encode_seg(result, [source], THRESHOLD).dataset, tmp_path / "seg.dcm")
    assert new_errors(path, source_path) == set()
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "FRACTIONAL" and seg.NumberOfFrames == 1
    read = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=[1], combine_segments=False
    )
    assert np.abs(read[0, ..., 0] - probability).max() <= 0.5 / 255 + 1e-6


def test_which_sources_need_frame_by_frame() -> None:
    single = pydicom.dcmread(CR)
    assert not needs_frame_by_frame([single])
    other = copy.deepcopy(single)
    other.SOPInstanceUID = "1.2.3.4"
    assert needs_frame_by_frame([single, other])
    assert needs_frame_by_frame([pydicom.dcmread(data("OBXXXX1A_rle_2frame.dcm"))])
    placed = Dataset()
    placed.FrameOfReferenceUID = "1.2.3"
    placed.ImagePositionPatient = [0, 0, 0]
    assert not needs_frame_by_frame([placed, placed])


def test_a_multi_frame_ultrasound_of_one_frame(tmp_path: Path) -> None:
    """A US Multi-frame image with one frame is of a multi-frame IOD, which highdicom
    reads as an enhanced image (shared functional groups): it goes frame by frame too."""
    ds = pydicom.dcmread(data("OBXXXX1A_2frame.dcm"))  # uncompressed, but of US Image
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_MULTI_FRAME
    frame_bytes = int(ds.Rows) * int(ds.Columns)
    ds.PixelData = ds.PixelData[:frame_bytes]
    ds.NumberOfFrames = 1
    source_path = save(ds, tmp_path / "one-frame.dcm")
    source = read_image_file(source_path)
    image: Volume = datasets_to_image([source])
    assert needs_frame_by_frame([source]) and image.shape[0] == 1
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[0, 10:20, 10:30] = 1
    result = LabelResult(labels=labels, geometry=image, segments=segments(1))
    path = save(encode_seg(result, [source], THRESHOLD).dataset, tmp_path / "seg.dcm")
    assert new_errors(path, source_path) == set()
    seg = hd.seg.segread(path)
    read = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, source_frame_numbers=[1], combine_segments=True
    )
    assert np.array_equal(read, labels)
