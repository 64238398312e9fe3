"""LabelResult -> DICOM SEG: dciodvfy-clean, masks and references read back with highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from encode_checks import problems, real_file, save
from pydicom.dataset import Dataset

from dicom_node.encode.common import EncodeError
from dicom_node.encode.seg import encode_seg
from dicom_node.encode.uids import Provenance
from dicom_node.synthetic import SyntheticSeries, generate_series
from dicom_node.volume import load_series
from processors.api import run_processor
from processors.base import Codes, LabelResult, SegmentDescription, Volume

KMEANS = Provenance("kmeans", "1.0.0", "cluster", {"k": 3, "seed": 0})


@pytest.fixture(scope="module")
def ct() -> SyntheticSeries:
    return generate_series(num_slices=8, rows=64, columns=64, uid_seed="encode-seg")


def read_back(seg: hd.seg.Segmentation, path: Path) -> hd.seg.Segmentation:
    save(seg, path)
    return hd.seg.segread(path)


def labelmap(seg: hd.seg.Segmentation, uids: tuple[str, ...]) -> np.ndarray:
    """The SEG as a label map of segment numbers, in the given source-instance order."""
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(uids),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(pixels)


def test_kmeans_seg_is_valid_and_reads_back(ct: SyntheticSeries, tmp_path: Path) -> None:
    volume = load_series(ct.datasets)
    result = run_processor("kmeans", volume, k=3, seed=0)[0]
    assert isinstance(result, LabelResult)
    encoding = encode_seg(result, ct.datasets, KMEANS)
    path = tmp_path / "seg.dcm"
    seg = read_back(encoding.dataset, path)
    assert problems(path) == []

    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert np.array_equal(labelmap(seg, volume.sop_instance_uids), result.labels)
    # One segment per label, coded, with the algorithm and its parameters.
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    for item, described in zip(seg.SegmentSequence, result.segments, strict=True):
        assert item.SegmentLabel == described.name
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == described.category.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == described.type.value
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "kmeans" and algorithm.AlgorithmVersion == "1.0.0"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Cluster Analysis"
        assert "k=3" in algorithm.AlgorithmParameters
    assert seg.ManufacturerModelName == "kmeans" and "kmeans 1.0.0" in seg.SoftwareVersions
    # Same study, frame of reference and patient; references resolve to the inputs.
    source = ct.datasets[0]
    assert seg.StudyInstanceUID == ct.study_instance_uid
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID != ct.series_instance_uid
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ct.series_instance_uid
    source_uids = {d.SOPInstanceUID for d in ct.datasets}
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == (
        source_uids
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPInstanceUID in source_uids


def test_empty_frames_are_omitted_and_gapped_labels_renumbered(
    ct: SyntheticSeries, tmp_path: Path
) -> None:
    volume = load_series(ct.datasets)
    labels = np.zeros(volume.shape, dtype=np.int32)
    labels[2:4, 10:20, 10:20] = 3  # label 2 unused: segments 1 and 3 -> numbers 1 and 2
    labels[5, 30:40, 30:40] = 1
    labels[6, 0:5, 0:5] = 7  # not described: background
    result = LabelResult(
        labels,
        (
            SegmentDescription(1, "first", Codes.TISSUE, Codes.SOFT_TISSUE),
            SegmentDescription(3, "third", Codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Codes.LESION),
        ),
        volume,
        "manual",
    )
    encoding = encode_seg(result, list(reversed(ct.datasets)), KMEANS)
    assert encoding.segment_numbers == {1: 1, 3: 2}
    path = tmp_path / "seg.dcm"
    seg = read_back(encoding.dataset, path)
    assert problems(path) == []
    assert int(seg.NumberOfFrames) == 3  # two slices of segment 2, one of segment 1
    expected = np.select([labels == 1, labels == 3], [1, 2], 0)
    assert np.array_equal(labelmap(seg, volume.sop_instance_uids), expected)


def test_probability_map_is_fractional(ct: SyntheticSeries, tmp_path: Path) -> None:
    volume = load_series(ct.datasets)
    probability = np.zeros(volume.shape, dtype=np.float32)
    probability[3, 20:40, 20:40] = 0.8
    probability[4, 20:40, 20:40] = 1.0
    result = LabelResult(
        probability,
        (
            SegmentDescription(
                1, "lesion probability", Codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Codes.LESION
            ),
        ),
        volume,
    )
    path = tmp_path / "frac.dcm"
    seg = read_back(encode_seg(result, ct.datasets, KMEANS).dataset, path)
    assert problems(path) == []
    assert seg.SegmentationType == "FRACTIONAL" and int(seg.NumberOfFrames) == 2
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids),
        assert_missing_frames_are_empty=True,
    )[..., 0]
    assert np.allclose(pixels, probability, atol=1 / 255)


def test_same_input_gives_the_same_uids(ct: SyntheticSeries) -> None:
    volume = load_series(ct.datasets)
    first = encode_seg(run_processor("kmeans", volume, k=3)[0], ct.datasets, KMEANS)  # type: ignore[arg-type]
    second = encode_seg(run_processor("kmeans", volume, k=3)[0], ct.datasets, KMEANS)  # type: ignore[arg-type]
    assert first.sop_instance_uid == second.sop_instance_uid
    assert first.dataset.SeriesInstanceUID == second.dataset.SeriesInstanceUID
    other = Provenance("kmeans", "1.0.0", "cluster", {"k": 4, "seed": 0})
    third = encode_seg(run_processor("kmeans", volume, k=3)[0], ct.datasets, other)  # type: ignore[arg-type]
    assert third.sop_instance_uid != first.sop_instance_uid


@pytest.mark.parametrize(
    ("name", "processor", "params"),
    [
        ("CT_small.dcm", "threshold_segment", {"preset": "body"}),
        ("MR_small.dcm", "kmeans", {"k": 3}),
    ],
)
def test_real_files(name: str, processor: str, params: dict[str, object], tmp_path: Path) -> None:
    source_path, source = real_file(name)
    volume = load_series([source])
    result = run_processor(processor, volume, **params)[0]
    assert isinstance(result, LabelResult) and result.segments
    provenance = Provenance(processor, "1.0.0", "segment", params)
    path = tmp_path / "seg.dcm"
    seg = read_back(encode_seg(result, [source], provenance).dataset, path)
    assert problems(path, source=source_path) == []
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    expected = np.asarray(result.labels)
    assert np.array_equal(labelmap(seg, volume.sop_instance_uids), expected)


def test_refusals(ct: SyntheticSeries) -> None:
    volume = load_series(ct.datasets)
    result = run_processor("kmeans", volume, k=2)[0]
    assert isinstance(result, LabelResult)
    with pytest.raises(EncodeError, match="not among the given"):
        encode_seg(result, ct.datasets[:-1], KMEANS)
    bare = LabelResult(result.labels, result.segments, Volume(np.zeros(volume.shape)))
    with pytest.raises(EncodeError, match="no source instance UIDs"):
        encode_seg(bare, ct.datasets, KMEANS)
    with pytest.raises(EncodeError, match="without segments"):
        encode_seg(LabelResult(result.labels, (), volume), ct.datasets, KMEANS)


def test_enhanced_multiframe_source(ct: SyntheticSeries, tmp_path: Path) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    multi = LegacyConvertedEnhancedCTImage(
        list(reversed(ct.datasets)),
        series_instance_uid=pydicom.uid.generate_uid(),
        series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    volume = load_series([multi])
    assert volume.source_frame_numbers
    labels = np.zeros(volume.shape, dtype=np.uint8)  # differs slice by slice
    for z in range(volume.shape[0]):
        labels[z, 4 * z : 4 * z + 6, 10:30] = 1 + z % 2
    segments = (
        SegmentDescription(1, "odd", Codes.TISSUE, Codes.SOFT_TISSUE),
        SegmentDescription(2, "even", Codes.TISSUE, Codes.BONE),
    )
    result = LabelResult(labels, segments, volume)
    path = tmp_path / "seg.dcm"
    seg = read_back(encode_seg(result, [multi], KMEANS).dataset, path)
    assert problems(path) == []
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == multi.SeriesInstanceUID
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=multi.SOPInstanceUID,
        source_frame_numbers=list(volume.source_frame_numbers),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(pixels, result.labels)


def test_a_series_that_grew_gets_a_new_seg() -> None:
    series = generate_series(num_slices=4, rows=32, columns=32, uid_seed="grows")
    provenance = Provenance("threshold_segment", "1.0.0", "segment", {"preset": "body"})

    def seg_uids(datasets: list[Dataset]) -> tuple[str, str]:
        result = run_processor("threshold_segment", load_series(datasets), preset="body")[0]
        seg = encode_seg(result, datasets, provenance)  # type: ignore[arg-type]
        return seg.sop_instance_uid, seg.dataset.SeriesInstanceUID

    fewer = seg_uids(series.datasets[:-1])
    assert fewer == seg_uids(series.datasets[:-1])
    assert not set(fewer) & set(seg_uids(series.datasets))
