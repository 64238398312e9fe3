"""``MeasurementResult`` -> a TID 1500 Measurement Report (highdicom ``Comprehensive3DSR``).

- Per-segment measurements (volume, mean, std, ...) become one volumetric measurement group
  per segment that references the segment of the SEG encoded from the same run
  (``ReferencedSegment``), with the segment's category and type as finding category/type.
  Without a SEG the group carries only a tracking identifier naming the segment.
- Measurements without a segment go into one group for the whole image.
- Each classification becomes a group whose finding type is the classified concept, with a
  qualitative evaluation (the class, coded) and a numeric probability (UCUM ``1``).
- The observer context names the device: the node with the processor as model name.
  Every group carries the algorithm identification (name, version, parameters).
- Evidence: the source series' instances (and the SEG, when given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode.common import (
    EncodeError,
    coded,
    coding_schemes,
    input_key,
    long_string,
    output_identity,
    refused_by_highdicom,
    source_series_uid,
)
from dicom_node.encode.seg import SegEncoding
from dicom_node.encode.uids import MANUFACTURER, Provenance, derive_uid
from processors.base import (
    Classification,
    Code,
    Codes,
    LabelResult,
    Measurement,
    MeasurementResult,
    Units,
    Volume,
)

PROBABILITY = Codes.local("probability", "Probability")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")


def _measurement(item: Measurement, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=coded(item.concept),
        value=float(item.value),
        unit=coded(item.unit),
        algorithm_id=algorithm,
    )


def _class_value(item: Classification) -> Code:
    if item.value is not None:
        return item.value
    slug = "".join(c if c.isalnum() else "-" for c in item.label.lower())[:16] or "class"
    return Codes.local(slug, item.label)


def encode_sr(
    result: MeasurementResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    geometry: Volume | None = None,
    seg: SegEncoding | None = None,
    labels: LabelResult | None = None,
    index: int = 0,
) -> hd.sr.Comprehensive3DSR:
    """The measurement report for ``result`` over the source series ``sources``.

    ``seg`` (and the ``labels`` it was encoded from, for segment names and codes) lets the
    per-segment groups reference their segments.
    """
    if not sources:
        raise EncodeError("a measurement report needs the source instances as evidence")
    if not result.measurements and not result.classifications:
        raise EncodeError("a measurement report without measurements or classifications")
    if geometry is None and labels is not None:
        geometry = labels.geometry
    series_uid = source_series_uid(geometry, sources)
    key = input_key(geometry, sources)
    algorithm = hd.sr.AlgorithmIdentification(
        name=long_string(provenance.processor),
        version=long_string(provenance.version),
        parameters=[f"{k}={v}"[:64] for k, v in provenance.parameters_text().items()] or None,
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid(provenance.uid_root, "device", provenance.processor, provenance.version),
            name=long_string(f"{provenance.processor} {provenance.version}"),
            manufacturer_name=MANUFACTURER,
            model_name=long_string(provenance.processor),
            serial_number=long_string(provenance.device_version),
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=device)
    segments = {s.label: s for s in labels.segments} if labels else {}
    groups: list[Any] = []
    used: list[Code] = []

    per_segment: dict[int, list[Measurement]] = {}
    whole: list[Measurement] = []
    for item in result.measurements:
        used += [item.concept, item.unit]
        if item.segment is None:
            whole.append(item)
        else:
            per_segment.setdefault(item.segment, []).append(item)

    for label, items in sorted(per_segment.items()):
        described = segments.get(label)
        name = described.name if described else f"segment {label}"
        tracking = hd.sr.TrackingIdentifier(
            uid=provenance.instance_uid(key, "sr-group", index, label),
            identifier=long_string(f"{provenance.processor} {name}"),
        )
        measurements = [_measurement(m, algorithm) for m in items]
        kwargs: dict[str, Any] = {}
        if described is not None:
            kwargs["finding_category"] = coded(described.category)
            kwargs["finding_type"] = coded(described.type)
            used += [described.category, described.type]
        if seg is not None and label in seg.segment_numbers:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=str(seg.dataset.SOPClassUID),
                        sop_instance_uid=seg.sop_instance_uid,
                        segment_number=seg.segment_numbers[label],
                        source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
                    ),
                    algorithm_id=algorithm,
                    measurements=measurements,
                    **kwargs,
                )
            )
        else:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    algorithm_id=algorithm,
                    measurements=measurements,
                    **kwargs,
                )
            )

    if whole:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=provenance.instance_uid(key, "sr-group", index, 0),
                    identifier=long_string(f"{provenance.processor} image"),
                ),
                algorithm_id=algorithm,
                measurements=[_measurement(m, algorithm) for m in whole],
            )
        )

    for number, finding in enumerate(result.classifications, start=1):
        value = _class_value(finding)
        used += [finding.concept, value, PROBABILITY, Units.NO_UNITS]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=provenance.instance_uid(key, "sr-class", index, number),
                    identifier=long_string(f"{finding.concept.meaning}: {finding.label}"),
                ),
                finding_type=coded(finding.concept),
                algorithm_id=algorithm,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(name=coded(finding.concept), value=coded(value))
                ],
                measurements=[
                    hd.sr.Measurement(
                        name=coded(PROBABILITY),
                        value=float(finding.probability),
                        unit=coded(Units.NO_UNITS),
                        algorithm_id=algorithm,
                    )
                ],
            )
        )

    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=coded(IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    evidence = list(sources) + ([seg.dataset] if seg is not None else [])
    description = result.description or f"{provenance.processor} measurements"
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            **output_identity(provenance, "sr", key, index),
            is_complete=True,
            series_description=long_string(f"SR {description}"),
            coding_schemes=coding_schemes(used) or None,
        )
    # AttributeError: highdicom reads a Type 2 element the source lacks (PatientID).
    except (ValueError, TypeError, AttributeError) as exc:
        raise refused_by_highdicom("the measurement report", exc) from exc
