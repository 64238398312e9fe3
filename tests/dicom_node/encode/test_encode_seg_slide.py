"""A whole slide's SEG written a tile at a time (``encode.seg.streamed_slide_seg``): read
back, the same dataset as highdicom's from the whole label map, element for element and
Pixel Data byte for byte, apart from what highdicom makes anew each time (its dimension
organisation UID, the creation time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_checks import dciodvfy
from pydicom.dataset import Dataset

from dicom_node.encode.seg import SegEncoding, encode_seg, write_streamed
from dicom_node.process import build_steps
from dicom_node.slide import Slide
from dicom_node.slide_process import SlidePixels, kmeans_slide, threshold_slide
from dicom_node.testing_slide import Disc, write_disc_slide
from processors.base import LabelResult, Result

DISCS = [
    Disc(60, 70, 25),
    Disc(128, 128, 40, stain=1),
    Disc(250, 400, 55),
    Disc(230, 250, 33, stain=1),
    Disc(270, 560, 27),
]
#: Made anew by highdicom for every SEG: not the encoding's to keep.
FRESH = {"InstanceCreationTime", "ContentTime", "ContributingEquipmentSequence"}


def labels_of(results: list[Result]) -> LabelResult:
    found = [r for r in results if isinstance(r, LabelResult)]
    assert len(found) == 1
    return found[0]


def segment(tmp_path: Path, tile: int, pipeline: str, params: dict[str, Any]) -> Path:
    """Run a label step over a 300x600 generated slide tiled ``tile`` and write its SEG
    both ways: ``streamed.dcm`` (a tile at a time) and ``whole.dcm`` (highdicom's)."""
    path = tmp_path / "slide.dcm"
    write_disc_slide(path, rows=300, columns=600, discs=DISCS, tile=tile)
    step = build_steps([pipeline], params={pipeline: params})[0]
    runner = threshold_slide if pipeline == "threshold_segment" else kmeans_slide
    with Slide(path) as slide:
        result = labels_of(runner(SlidePixels(slide), step.params, slide.geometry(), 256))
        source = slide.header
        streamed = encode_seg(result, [source], step.provenance)
        assert streamed.frames is not None and "PixelData" not in streamed.dataset
        assert "PerFrameFunctionalGroupsSequence" not in streamed.dataset
        write(streamed, tmp_path / "streamed.dcm")
        whole = encode_seg(result, [source], step.provenance, whole_slide_in_memory=True)
        assert whole.frames is None
        whole.dataset.save_as(tmp_path / "whole.dcm", enforce_file_format=True)
    return path


def write(encoding: SegEncoding, path: Path) -> None:
    write_streamed(encoding, path, None)


def without_fresh_uids(ds: Dataset) -> Dataset:
    for item in [*ds.DimensionOrganizationSequence, *ds.DimensionIndexSequence]:
        item.DimensionOrganizationUID = "1.2.3"
    return ds


@pytest.mark.parametrize(
    ("tile", "pipeline", "params", "segments"),
    [
        # one segment; edge tiles cut on the right and at the bottom (300 = 2x128 + 44)
        ("128", "threshold_segment", {"preset": "body"}, 1),
        # a segment per disc, discs across tile borders; 96: right edge tiles cut
        ("96", "threshold_segment", {"preset": "body", "separate_components": True}, 5),
        # k-means classes (3 segments), small tiles
        ("64", "kmeans", {"k": 3, "inside_body": False, "seed": 0}, 3),
    ],
)
def test_the_streamed_seg_is_highdicoms_seg_of_the_whole_label_map(
    tmp_path: Path, tile: str, pipeline: str, params: dict[str, Any], segments: int
) -> None:
    source = segment(tmp_path, int(tile), pipeline, params)
    streamed = without_fresh_uids(pydicom.dcmread(tmp_path / "streamed.dcm"))
    whole = without_fresh_uids(pydicom.dcmread(tmp_path / "whole.dcm"))
    assert len(whole.SegmentSequence) == segments
    assert whole.DimensionOrganizationType == "TILED_SPARSE"
    assert streamed.file_meta == whole.file_meta
    assert [e.tag for e in streamed] == [e.tag for e in whole]
    for element in whole:
        if element.keyword not in FRESH:
            assert streamed[element.tag] == element, element.keyword
    assert streamed.PixelData == whole.PixelData  # byte for byte
    read = hd.seg.segread(tmp_path / "streamed.dcm")
    assert read.get_total_pixel_matrix().shape[:2] == (300, 600)
    new = {e for e in dciodvfy(tmp_path / "streamed.dcm") if e.startswith("Error")}
    assert not new - {e for e in dciodvfy(source) if e.startswith("Error")}


def test_a_tile_that_is_not_a_whole_number_of_bytes_is_left_to_highdicom(tmp_path: Path) -> None:
    """90x90 pixels are 1012.5 bytes at 1 bit a pixel: frames run across byte borders, and
    highdicom packs the whole array."""
    path = tmp_path / "slide.dcm"
    write_disc_slide(path, rows=200, columns=200, discs=DISCS[:2], tile=90)
    step = build_steps(["threshold_segment"], params={"threshold_segment": {"preset": "body"}})[0]
    with Slide(path) as slide:
        result = labels_of(threshold_slide(SlidePixels(slide), step.params, slide.geometry()))
        encoding = encode_seg(result, [slide.header], step.provenance)
    assert encoding.frames is None and "PixelData" in encoding.dataset


def test_labels_that_skip_values_become_segment_numbers_tile_by_tile(tmp_path: Path) -> None:
    """Labels 2 and 5 (a k-means class left empty between them) are segments 1 and 2, as
    in highdicom's SEG of the renumbered map."""
    path = tmp_path / "slide.dcm"
    write_disc_slide(path, rows=256, columns=256, discs=DISCS[:2], tile=64)
    step = build_steps(["threshold_segment"], params={"threshold_segment": {"preset": "body"}})[0]
    with Slide(path) as slide:
        result = labels_of(threshold_slide(SlidePixels(slide), step.params, slide.geometry()))
        labels = np.asarray(result.labels).astype(np.uint8) * 2
        labels[0, 200:, 200:] = 5
        described = result.segments[0]
        segments = (
            type(described)(2, "two", described.category, described.type),
            type(described)(5, "five", described.category, described.type),
        )
        renumbered = LabelResult(labels, segments, result.geometry)
        streamed = encode_seg(renumbered, [slide.header], step.provenance)
        whole = encode_seg(renumbered, [slide.header], step.provenance, whole_slide_in_memory=True)
    assert streamed.segment_numbers == whole.segment_numbers == {2: 1, 5: 2}
    write(streamed, tmp_path / "streamed.dcm")
    assert pydicom.dcmread(tmp_path / "streamed.dcm").PixelData == whole.dataset.PixelData
