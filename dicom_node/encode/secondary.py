"""``ImageResult`` of a 2-D source -> a Secondary Capture series (highdicom ``SCImage``).

What a 2-D source's derived image is written as when its SOP class is not kept
(``dicom_node.encode.planar_derived`` decides, and keeps CR, DX and MG For Presentation
and US): one instance per frame, the reason in its DerivationDescription. Colour stays
colour: an RGB result (values in [0, 1]) is written as 8-bit RGB; a greyscale one as
16-bit MONOCHROME2, its values mapped linearly onto 0..65535 with the mapping stated in
the description. Patient and study come from the source (``SCImage.from_ref_dataset``),
each instance's SourceImageSequence names its source instance (and frame), and the UIDs
are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.encode.common import SERIES_NUMBER, EncodeError, input_key, long_string
from dicom_node.encode.derived import processing_equipment, source_item
from dicom_node.encode.uids import MANUFACTURER, Provenance
from processors.base import ImageResult

SECONDARY_CAPTURE = "Secondary Capture Image Storage"


def _stored(values: npt.NDArray[Any], colour: bool) -> tuple[npt.NDArray[Any], str]:
    """The frames as stored pixels, and how the values were mapped onto them."""
    if colour:
        stored = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return stored, "RGB values in 0..1 stored as 0..255"
    low, high = float(values.min()), float(values.max())
    slope = (high - low) / 65535.0 if high > low else 1.0
    stored = np.clip(np.rint((values - low) / slope), 0, 65535).astype(np.uint16)
    return stored, f"values stored as (value - {low:.6g}) / {slope:.6g}"


def secondary_capture_instances(
    result: ImageResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    index: int = 0,
    why: str = "the source's SOP class is not kept for 2-D images",
) -> Iterator[Dataset]:
    """One Secondary Capture instance per frame of a planar ``result``; ``why`` (the
    source's SOP class was not kept) goes into its DerivationDescription."""
    geometry = result.volume
    if not geometry.planar:
        raise EncodeError("Secondary Capture outputs are for 2-D sources")
    values = np.asarray(geometry.array, dtype=np.float32)
    if not np.isfinite(values).all():
        raise EncodeError("the derived image holds NaN or infinite values")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [uid for uid in geometry.sop_instance_uids if uid not in by_uid]
    if not geometry.sop_instance_uids or missing:
        raise EncodeError("the derived image's source instances are not among the datasets")
    key = input_key(geometry, sources)
    stored, mapping = _stored(values, geometry.colour)
    description = result.description or f"{provenance.processor} output"
    derivation = (
        f"{description}: {provenance.summary()}; {mapping}; written as {SECONDARY_CAPTURE} ({why})"
    )
    equipment = processing_equipment(provenance)
    spacing = geometry.spacing[1:] if geometry.spacing_known else None

    def instances() -> Iterator[Dataset]:
        for z, uid in enumerate(geometry.sop_instance_uids):
            source = by_uid[uid]
            frame = geometry.source_frame_numbers[z] if geometry.source_frame_numbers else None
            orientation = source.get("PatientOrientation")
            try:
                image = hd.sc.SCImage.from_ref_dataset(
                    ref_dataset=source,
                    pixel_array=stored[z],
                    photometric_interpretation="RGB" if geometry.colour else "MONOCHROME2",
                    bits_allocated=8 if geometry.colour else 16,
                    coordinate_system="PATIENT",
                    series_instance_uid=provenance.series_uid(key, "derived", index),
                    series_number=SERIES_NUMBER["derived"] + index,
                    sop_instance_uid=provenance.instance_uid(key, "derived", index, z),
                    instance_number=z + 1,
                    manufacturer=MANUFACTURER,
                    pixel_spacing=spacing,  # type: ignore[arg-type]  # floats, in fact
                    # highdicom takes single-letter directions only; the source's value
                    # (or empty, Type 2) replaces this placeholder below.
                    patient_orientation=("L", "F"),
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    contributing_equipment=[equipment],
                    series_description=long_string(description),
                )
            except (ValueError, TypeError, AttributeError) as exc:
                raise EncodeError(f"highdicom refused the Secondary Capture: {exc}") from exc
            image.PatientOrientation = list(orientation) if orientation else []
            image.Laterality = source.get("Laterality", "")  # Type 2C: the source's, or empty
            image.ImageType = ["DERIVED", "SECONDARY"]
            image.DerivationDescription = derivation[:1024]
            image.SourceImageSequence = [source_item(source, frame)]
            yield image

    return instances()
