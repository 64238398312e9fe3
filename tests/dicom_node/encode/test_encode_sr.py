"""MeasurementResult -> TID 1500 report: valid, values and references read back."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest
from encode_checks import problems, real_file, save

from dicom_node.encode.common import EncodeError
from dicom_node.encode.seg import encode_seg
from dicom_node.encode.sr import encode_sr
from dicom_node.encode.uids import Provenance
from dicom_node.synthetic import SyntheticSeries, generate_series
from dicom_node.volume import load_series
from processors.api import run_processor
from processors.base import LabelResult, MeasurementResult

SEGMENT = Provenance("threshold_segment", "1.0.0", "segment", {"preset": "bone"})
PREDICT = Provenance("predict", "1.0.0", "predict", {"model": "demo-lesion-presence"})


@pytest.fixture(scope="module")
def ct() -> SyntheticSeries:
    return generate_series(num_slices=8, rows=64, columns=64, uid_seed="encode-sr")


def segment_and_measure(
    sources: list, processor: str, provenance: Provenance, **params: object
) -> tuple[LabelResult, MeasurementResult]:
    volume = load_series(sources)
    labels, measures = run_processor(processor, volume, **params)
    assert isinstance(labels, LabelResult) and isinstance(measures, MeasurementResult)
    return labels, measures


def test_segment_statistics_reference_the_seg(ct: SyntheticSeries, tmp_path: Path) -> None:
    labels, measures = segment_and_measure(
        ct.datasets, "threshold_segment", SEGMENT, preset="bone", separate_components=True
    )
    seg = encode_seg(labels, ct.datasets, SEGMENT)
    path = save(
        encode_sr(measures, ct.datasets, SEGMENT, seg=seg, labels=labels), tmp_path / "sr.dcm"
    )
    assert problems(path) == []  # SCT, DCM and UCUM codes only: no warning tolerated
    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == ct.study_instance_uid
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    described = {s.label: s for s in labels.segments}
    assert len(groups) == len({m.segment for m in measures.measurements})
    for group in groups:
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.sop_instance_uid
        (number,) = reference.referenced_segment_numbers
        assert reference.source_series_for_segmentation.value == ct.series_instance_uid
        label = next(lab for lab, num in seg.segment_numbers.items() if num == number)
        assert group.finding_type.value == described[label].type.value
        read = {m.name.meaning: m.value for m in group.get_measurements()}
        expected = {m.concept.meaning: m.value for m in measures.measurements if m.segment == label}
        assert read.keys() == expected.keys()
        for meaning, value in expected.items():
            assert read[meaning] == pytest.approx(value, rel=1e-9, abs=1e-9)
    # Observer context: the device is the node running this processor.
    device = report.get_observer_contexts(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device")
    )
    assert device, "no device observer"
    # Evidence: the source series and the SEG.
    evidence = {
        i.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == {d.SOPInstanceUID for d in ct.datasets} | {seg.sop_instance_uid}
    assert sr.CompletionFlag == "COMPLETE"
    assert "threshold_segment 1.0.0" in sr.SoftwareVersions


def test_classification_probabilities(ct: SyntheticSeries, tmp_path: Path) -> None:
    volume = load_series(ct.datasets)
    (result,) = run_processor("predict", volume)
    assert isinstance(result, MeasurementResult) and result.classifications
    path = save(encode_sr(result, ct.datasets, PREDICT, geometry=volume), tmp_path / "sr.dcm")
    # The target concept is local to this node (99DCMNODE): see encode_checks.
    assert problems(path, allow_private_scheme=True) == []
    sr = hd.sr.srread(path)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DCMNODE"
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(result.classifications)
    for group, expected in zip(groups, result.classifications, strict=True):
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name.value == expected.concept.value
        assert expected.value is not None and evaluation.value.value == expected.value.value
        (probability,) = group.get_measurements()
        assert probability.value == pytest.approx(expected.probability)
        assert probability.unit.value == "1"


def test_real_ct_and_uids_are_stable(tmp_path: Path) -> None:
    source_path, source = real_file("CT_small.dcm")
    labels, measures = segment_and_measure([source], "threshold_segment", SEGMENT, preset="body")
    seg = encode_seg(labels, [source], SEGMENT)
    report = encode_sr(measures, [source], SEGMENT, seg=seg, labels=labels)
    path = save(report, tmp_path / "sr.dcm")
    assert problems(path, source=source_path) == []
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    volume = next(m for m in group.get_measurements() if m.name.meaning == "Volume")
    assert volume.value == pytest.approx(measures.value("Volume", 1))
    again = encode_sr(measures, [source], SEGMENT, seg=seg, labels=labels)
    assert again.SOPInstanceUID == report.SOPInstanceUID
    assert again.SeriesInstanceUID == report.SeriesInstanceUID


def test_without_seg_groups_name_the_segment(ct: SyntheticSeries, tmp_path: Path) -> None:
    labels, measures = segment_and_measure(ct.datasets, "threshold_segment", SEGMENT, preset="bone")
    path = save(encode_sr(measures, ct.datasets, SEGMENT, labels=labels), tmp_path / "sr.dcm")
    assert problems(path) == []
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert groups and groups[0].tracking_identifier.startswith("threshold_segment")
    with pytest.raises(EncodeError, match="without measurements"):
        encode_sr(MeasurementResult(), ct.datasets, SEGMENT, geometry=labels.geometry)
