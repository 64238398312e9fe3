"""SEG encoding: ``dicom_node.encode.seg.encode_seg`` vs highdicom called directly, one run.

    .venv/bin/python bench/encode_seg.py [--slices 300] [--size 512] [--rounds 3]

A synthetic CT of ``slices`` x ``size`` x ``size`` and a 4-label map from the phantom's
truth (body, lung, bone, lesion). Both sides encode the same label map against the same
source datasets with the same options (BINARY, Explicit VR Little Endian, empty frames
omitted, one worker); one untimed warm-up each, then rounds alternate between the two.
Prints the median seconds of each
and the ratio (target <= 1.1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# bench/processors.py would shadow the processors package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_node.encode.seg import encode_seg
from dicom_node.encode.uids import Provenance
from dicom_node.synthetic import generate_series
from dicom_node.volume import datasets_to_volume
from processors.base import Codes, LabelResult, SegmentDescription

SEGMENTS = (
    SegmentDescription(1, "body", Codes.ANATOMICAL_STRUCTURE, Codes.ENTIRE_BODY),
    SegmentDescription(2, "lung", Codes.ANATOMICAL_STRUCTURE, Codes.LUNG),
    SegmentDescription(3, "bone", Codes.TISSUE, Codes.BONE),
    SegmentDescription(4, "lesion", Codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, Codes.LESION),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    series = generate_series(
        num_slices=args.slices, rows=args.size, columns=args.size, uid_seed="bench-seg"
    )
    volume = datasets_to_volume(series.datasets)
    truth = series.phantom.labels
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for value, name in enumerate(("body", "lung", "bone", "lesion"), start=1):
        labels[truth[name]] = value
    result = LabelResult(labels, SEGMENTS, volume, "bench")
    provenance = Provenance("bench_segment", "1.0.0", "segment", {"labels": 4})
    by_uid = {d.SOPInstanceUID: d for d in series.datasets}
    ordered = [by_uid[uid] for uid in volume.sop_instance_uids]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="bench_segment", family=codes.cid7162.MorphologicalOperations, version="1.0.0"
    )

    def ours() -> int:
        return int(encode_seg(result, series.datasets, provenance).dataset.NumberOfFrames)

    def direct() -> int:
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=s.label,
                segment_label=s.name,
                segmented_property_category=hd.sr.CodedConcept(
                    s.category.value, s.category.scheme, s.category.meaning
                ),
                segmented_property_type=hd.sr.CodedConcept(
                    s.type.value, s.type.scheme, s.type.meaning
                ),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
            for s in SEGMENTS
        ]
        seg = hd.seg.Segmentation(
            source_images=ordered,
            pixel_array=labels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=9100,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="dicom-node",
            manufacturer_model_name="bench_segment",
            software_versions="1.0.0",
            device_serial_number="0",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            omit_empty_frames=True,
        )
        return int(seg.NumberOfFrames)

    timings: dict[str, list[float]] = {"dicom-node": [], "highdicom": []}
    frames = {"dicom-node": ours(), "highdicom": direct()}  # warm-up (imports, caches)
    for _ in range(args.rounds):
        for name, encode in (("highdicom", direct), ("dicom-node", ours)):
            start = time.perf_counter()
            frames[name] = encode()
            timings[name].append(time.perf_counter() - start)
    assert frames["dicom-node"] == frames["highdicom"], frames
    node = statistics.median(timings["dicom-node"])
    reference = statistics.median(timings["highdicom"])
    print(
        f"SEG of {args.slices} slices {args.size}x{args.size}, 4 labels, "
        f"{frames['dicom-node']} frames; median of {args.rounds} rounds"
    )
    print("rounds:", {k: [round(t, 2) for t in v] for k, v in timings.items()})
    print(f"highdicom direct: {reference:.2f} s")
    print(f"dicom-node      : {node:.2f} s")
    print(f"ratio dicom-node / highdicom: {node / reference:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
