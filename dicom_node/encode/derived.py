"""``ImageResult`` -> a derived image series of the same SOP class as the source.

Each output slice is its source slice's header (patient, study, geometry, equipment kept)
with the new pixel data, ImageType ``DERIVED\\SECONDARY``, a DerivationDescription naming
the processor, version and parameters, a DerivationCodeSequence, a SourceImageSequence
pointing at the source slice, a ContributingEquipmentSequence for the node, a new series
and deterministic UIDs. Staying in the source's SOP class (CT Image, MR Image, ...) means
every PACS and viewer that showed the input shows the output.

Pixel values: when the result still fits the source's stored range through the source's
rescale (RescaleSlope/Intercept, identity when absent) after rounding, the rescale is kept.
Otherwise (a windowed image in 0..1, values beyond the stored range) the values are mapped
linearly onto the stored range: with a new RescaleSlope/Intercept where the SOP class has
them (CT), and stated in the DerivationDescription where it has none (MR).

Single-frame sources only: an enhanced multi-frame source raises ``EncodeError``.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.encode.common import (
    SERIES_NUMBER,
    EncodeError,
    input_key,
    long_string,
    ordered_sources,
    uncompressed_file_meta,
)
from dicom_node.encode.uids import MANUFACTURER, Provenance
from processors.base import ImageResult

#: Family -> CID 7203 (Image Derivation) code.
DERIVATION_CODES: dict[str, Any] = {
    "denoise": codes.cid7203.Smoothing,
    "enhance": codes.cid7203.EdgeEnhancement,
}
DEFAULT_DERIVATION = codes.cid7203.PixelByPixelMask

#: Header elements of the source that must not be carried to a derived image.
DROPPED = (
    "PixelData",
    "SourceImageSequence",
    "DerivationCodeSequence",
    "DerivationDescription",
    "ReferencedImageSequence",
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "WindowCenterWidthExplanation",
    "ContributingEquipmentSequence",
    "RequestAttributesSequence",
)

#: SOP classes whose Image module carries RescaleSlope/Intercept.
HAS_RESCALE = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
}


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _pixel_plan(values: npt.NDArray[Any], source: Dataset) -> tuple[float, float, int, int, bool]:
    """(slope, intercept, low, high, rescale kept) for writing ``values`` like ``source``."""
    low, high = _stored_range(source)
    slope = float(source.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    lo, hi = float(values.min()), float(values.max())
    stored_lo, stored_hi = (lo - intercept) / slope, (hi - intercept) / slope
    coarse = (hi - lo) / slope < 64.0 and not np.allclose(values, np.rint(values))
    if round(stored_lo) >= low and round(stored_hi) <= high and not coarse:
        return slope, intercept, low, high, True
    if str(source.SOPClassUID) not in HAS_RESCALE:
        # No rescale in this IOD: use an unsigned 12-bit range, documented in the header.
        low, high = 0, 4095
    span = hi - lo if hi > lo else 1.0
    new_slope = span / (high - low)
    return new_slope, lo - low * new_slope, low, high, False


def processing_equipment(provenance: Provenance) -> hd.ContributingEquipment:
    """The node and processor as the derived image's contributing equipment."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.cid7005.ProcessingEquipment,
        manufacturer_model_name=long_string(provenance.processor),
        software_versions=[provenance.software_versions, provenance.device_version],
        contribution_description=long_string(f"{provenance.processor} {provenance.version}"),
    )


def source_item(source: Dataset, frame: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    purpose = hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def encode_derived(
    result: ImageResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    index: int = 0,
    now: dt.datetime | None = None,
) -> list[Dataset]:
    """One derived instance per slice of ``result`` (slice order), ready to save."""
    return list(derived_instances(result, sources, provenance, index=index, now=now))


def derived_instances(
    result: ImageResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    index: int = 0,
    now: dt.datetime | None = None,
) -> Iterator[Dataset]:
    """``encode_derived`` one instance at a time, so that a caller writing each as it
    comes holds one slice's dataset, not the series'. The checks run before it returns:
    an ``EncodeError`` is raised by this call, not while iterating."""
    geometry = result.volume
    if geometry.source_frame_numbers:
        raise EncodeError("derived series from multi-frame sources are not supported yet")
    ordered = ordered_sources(geometry, sources)
    key = input_key(geometry, sources)
    values = np.asarray(result.volume.array)
    if values.dtype.kind not in "fiub":
        raise EncodeError(f"the derived image has values of type {values.dtype}")
    # NaN propagates through min and max, and an infinity is one of them.
    if not (np.isfinite(values.min()) and np.isfinite(values.max())):
        raise EncodeError("the derived image holds NaN or infinite values")
    first = ordered[0]
    if int(first.get("SamplesPerPixel", 1) or 1) != 1:
        raise EncodeError("only grayscale sources can have a derived series")
    slope, intercept, low, high, kept = _pixel_plan(values, first)
    signed = low < 0
    stored_type = np.int16 if signed else np.uint16

    def stored_slice(z: int) -> bytes:
        # Slice by slice: whole-volume float64 temporaries of a 512x512x200 CT are 400 MB.
        plane = (values[z].astype(np.float64) - intercept) / slope
        stored: bytes = np.clip(np.rint(plane), low, high).astype(stored_type).tobytes()
        return stored

    bits = 16 if signed or high > 4095 else 12
    has_rescale = "RescaleSlope" in first or str(first.SOPClassUID) in HAS_RESCALE

    description = result.description or f"{provenance.processor} output"
    derivation = f"{description}: {provenance.summary()}"
    if not kept and not has_rescale:
        derivation += f"; values stored as (value - {intercept:.6g}) / {slope:.6g}"
    new_series = provenance.series_uid(key, "derived", index)
    when = now or dt.datetime.now(dt.UTC)
    equipment = processing_equipment(provenance)
    code = hd.sr.CodedConcept.from_code(DERIVATION_CODES.get(provenance.family, DEFAULT_DERIVATION))

    def instances() -> Iterator[Dataset]:
        for z, source in enumerate(ordered):
            ds = Dataset()
            for element in source:
                if element.keyword not in DROPPED and not element.tag.is_private:
                    ds.add(copy.deepcopy(element))
            image_type = [str(v) for v in source.get("ImageType", [])]
            ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
            ds.SOPInstanceUID = provenance.instance_uid(key, "derived", index, z)
            ds.SeriesInstanceUID = new_series
            ds.SeriesNumber = SERIES_NUMBER["derived"] + index
            ds.SeriesDescription = long_string(description)
            ds.InstanceNumber = z + 1
            ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
            ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
            ds.DerivationDescription = derivation[:1024]
            ds.DerivationCodeSequence = [code]
            ds.SourceImageSequence = [source_item(source)]
            ds.ContributingEquipmentSequence = [equipment]
            ds.BitsAllocated = 16
            ds.BitsStored = bits
            ds.HighBit = bits - 1
            ds.PixelRepresentation = 1 if signed else 0
            ds.PhotometricInterpretation = "MONOCHROME2"
            if has_rescale:
                ds.RescaleSlope = f"{slope:.10g}"[:16]
                ds.RescaleIntercept = f"{intercept:.10g}"[:16]
            if not kept:
                # The source's window and rescale type describe other values: viewers auto-window.
                for keyword in ("WindowCenter", "WindowWidth", "RescaleType", "VOILUTSequence"):
                    if keyword in ds:
                        delattr(ds, keyword)
                if has_rescale and geometry.planar:
                    ds.RescaleType = "US"  # unspecified (a CR's Modality LUT macro needs one)
            ds.PixelData = stored_slice(z)
            ds.file_meta = uncompressed_file_meta(ds)
            yield ds

    return instances()
