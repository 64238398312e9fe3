"""``ImageResult`` of a 2-D source -> a derived image in the source's SOP class where its
IOD allows it, else Secondary Capture (``dicom_node.encode.secondary``), saying why.

Kept, each checked with dciodvfy on real files (tests/dicom_node/test_process_images.py):

- CR Image, Digital X-Ray and Digital Mammography X-Ray Image - For Presentation: the
  source's header with the new pixels written like a volume's derived slice
  (``dicom_node.encode.derived``: 16 bits allocated, 12 or 16 stored, unsigned,
  MONOCHROME2 since the values are bright = dense, the source's rescale kept when the
  values fit it, else a new one with RescaleType ``US``), then what the DX and MG Image
  modules ask of a MONOCHROME2 image for presentation: RescaleSlope 1 and RescaleIntercept
  0 (enumerated values: a remapping is stated in DerivationDescription instead),
  PresentationLUTShape ``IDENTITY``, PixelIntensityRelationshipSign turned over when the
  source was MONOCHROME1 (its stored values ran the other way; PixelIntensityRelationship
  is LIN or LOG only, so the source's stays), and a window (Type 1C for presentation): the
  image's own (inverted with it for a MONOCHROME1 source) while the values keep their
  meaning, else one spanning the stored values. A CR gets the same window and
  presentation LUT shape. MG's Mammography Image module (ImageLaterality,
  ViewCodeSequence, ...) and DX's detector and positioning are the source's, copied.
- Ultrasound Image and Ultrasound Multi-frame Image: 8 bits (what the US Image module
  takes for MONOCHROME2 and RGB), greyscale values stored as they are when they are whole
  numbers in 0..255, else mapped linearly onto 0..255 (stated in DerivationDescription),
  colour (RGB, YBR or palette sources) as RGB; the frames of a
  multi-frame source in one instance (its cine timing copied), a stack of single-frame
  images one instance each; the US Region Calibration (SequenceOfUltrasoundRegions) and
  the rest of the header copied.

Secondary Capture, with the reason in DerivationDescription: DX and MG For Processing
(their IOD describes detector values before presentation processing, which a derived
image no longer is), any other SOP class (XA, photos, ...), and a source that does not fit
the kept IOD (a colour DX).
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

from dicom_node.encode.common import (
    SERIES_NUMBER,
    EncodeError,
    input_key,
    long_string,
    uncompressed_file_meta,
)
from dicom_node.encode.derived import (
    DEFAULT_DERIVATION,
    DERIVATION_CODES,
    DROPPED,
    derived_instances,
    processing_equipment,
    source_item,
)
from dicom_node.encode.secondary import secondary_capture_instances
from dicom_node.encode.uids import Provenance
from processors.base import ImageResult

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTI_FRAME = "1.2.840.10008.5.1.4.1.1.3.1"

#: Greyscale projection images kept in their SOP class (written by ``derived``).
PROJECTION = {CR_IMAGE, DX_FOR_PRESENTATION, MG_FOR_PRESENTATION}
#: Those whose IOD has the DX Image module's presentation attributes.
FOR_PRESENTATION = {DX_FOR_PRESENTATION, MG_FOR_PRESENTATION}
ULTRASOUND = {US_IMAGE, US_MULTI_FRAME}
FOR_PROCESSING = {DX_FOR_PROCESSING, MG_FOR_PROCESSING}

#: A palette colour source's tables, which an RGB output must not carry.
PALETTE = (
    "RedPaletteColorLookupTableDescriptor",
    "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "PaletteColorLookupTableUID",
)


def kept_sop_class(result: ImageResult, sources: Sequence[Dataset]) -> tuple[str | None, str]:
    """The SOP class a 2-D result is written in (None: Secondary Capture), and why not."""
    classes = {str(ds.SOPClassUID) for ds in sources}
    if len(classes) != 1:
        return None, "the source images are of several SOP classes"
    (sop_class,) = classes
    if sop_class in FOR_PROCESSING:
        return None, (
            "a For Processing image holds detector values before presentation processing, "
            "which the derived image no longer is"
        )
    if sop_class in PROJECTION:
        if result.volume.colour:
            return None, "the result is colour, the source's IOD greyscale"
        return sop_class, ""
    if sop_class in ULTRASOUND:
        return sop_class, ""
    return None, "the node keeps CR, DX, MG and US SOP classes only"


def planar_derived_instances(
    result: ImageResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    index: int = 0,
    now: dt.datetime | None = None,
) -> Iterator[Dataset]:
    """The derived instances of a planar ``result``, in the source's SOP class where it is
    kept (``kept_sop_class``), else Secondary Capture saying why."""
    sop_class, why = kept_sop_class(result, sources)
    if sop_class is None:
        return secondary_capture_instances(result, sources, provenance, index=index, why=why)
    if sop_class in ULTRASOUND:
        return ultrasound_instances(result, sources, provenance, index=index, now=now)
    instances = derived_instances(result, sources, provenance, index=index, now=now)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    return (
        for_presentation(ds, by_uid[uid], result)
        for ds, uid in zip(instances, result.volume.sop_instance_uids, strict=True)
    )


def for_presentation(ds: Dataset, source: Dataset, result: ImageResult) -> Dataset:
    """A CR/DX/MG derived instance (``derived_instances``) made what its IOD asks of a
    MONOCHROME2 image for presentation."""
    inverted = str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    remapped = (slope, intercept) != (
        float(source.get("RescaleSlope", 1.0) or 1.0),
        float(source.get("RescaleIntercept", 0.0) or 0.0),
    )
    if str(ds.SOPClassUID) in FOR_PRESENTATION:
        ds.PresentationLUTShape = "IDENTITY"
        if (slope, intercept) != (1.0, 0.0):
            # The DX Image module's rescale is the identity (enumerated values 1 and 0).
            ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
            ds.DerivationDescription = (
                f"{ds.DerivationDescription}; values stored as (value - {intercept:.6g}) / "
                f"{slope:.6g}"
            )[:1024]
    elif "PresentationLUTShape" in ds:
        ds.PresentationLUTShape = "IDENTITY"
    if inverted and "PixelIntensityRelationshipSign" in ds:
        ds.PixelIntensityRelationshipSign = -int(ds.PixelIntensityRelationshipSign)
    if inverted or remapped:
        # The source's VOI LUT and window read values that ran the other way, or were others.
        for keyword in ("VOILUTSequence", "WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
    window = result.volume.window
    if window is not None and not remapped:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:.10g}"[:16], f"{window[1]:.10g}"[:16]
    if "WindowCenter" not in ds and str(ds.SOPClassUID) in FOR_PRESENTATION:
        # A window is Type 1C for presentation: one spanning the stored values.
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16)
        low, high = float(stored.min()), float(stored.max())
        ds.WindowCenter = f"{(low + high) / 2:.10g}"[:16]
        ds.WindowWidth = f"{max(high - low, 1.0):.10g}"[:16]
    return ds


def _eight_bits(values: npt.NDArray[Any], colour: bool) -> tuple[npt.NDArray[np.uint8], str]:
    """The frames as 8-bit stored values, and how the values were mapped onto them."""
    if colour:
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), (
            "RGB values in 0..1 stored as 0..255"
        )
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 255.0 and np.array_equal(values, np.rint(values)):
        return values.astype(np.uint8), "values stored as they are"
    slope = (high - low) / 255.0 if high > low else 1.0
    stored = np.clip(np.rint((values - low) / slope), 0, 255).astype(np.uint8)
    return stored, f"values stored as (value - {low:.6g}) / {slope:.6g} in 8 bits"


def ultrasound_instances(
    result: ImageResult,
    sources: Sequence[Dataset],
    provenance: Provenance,
    *,
    index: int = 0,
    now: dt.datetime | None = None,
) -> Iterator[Dataset]:
    """Derived Ultrasound (Multi-frame) Image instances: one per source instance, with
    that instance's frames. The checks run before it returns."""
    geometry = result.volume
    values = np.asarray(geometry.array, dtype=np.float32)
    if not np.isfinite(values).all():
        raise EncodeError("the derived image holds NaN or infinite values")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [uid for uid in geometry.sop_instance_uids if uid not in by_uid]
    if not geometry.sop_instance_uids or missing:
        raise EncodeError("the derived image's source instances are not among the datasets")
    frames_of: dict[str, list[int]] = {}
    for z, uid in enumerate(geometry.sop_instance_uids):
        frames_of.setdefault(uid, []).append(z)
    if geometry.source_frame_numbers:
        for slices in frames_of.values():
            slices.sort(key=lambda z: geometry.source_frame_numbers[z])
    key = input_key(geometry, sources)
    stored, mapping = _eight_bits(values, geometry.colour)
    description = result.description or f"{provenance.processor} output"
    derivation = f"{description}: {provenance.summary()}; {mapping}"
    series_uid = provenance.series_uid(key, "derived", index)
    when = now or dt.datetime.now(dt.UTC)
    equipment = processing_equipment(provenance)
    code = hd.sr.CodedConcept.from_code(DERIVATION_CODES.get(provenance.family, DEFAULT_DERIVATION))

    def instances() -> Iterator[Dataset]:
        for number, (uid, slices) in enumerate(frames_of.items(), start=1):
            source = by_uid[uid]
            ds = Dataset()
            for element in source:
                if element.keyword not in DROPPED + PALETTE and not element.tag.is_private:
                    ds.add(copy.deepcopy(element))
            image_type = [str(v) for v in source.get("ImageType", [])]
            ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
            ds.SOPInstanceUID = provenance.instance_uid(key, "derived", index, number - 1)
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = SERIES_NUMBER["derived"] + index
            ds.SeriesDescription = long_string(description)
            ds.InstanceNumber = number
            ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
            ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
            ds.DerivationDescription = derivation[:1024]
            ds.DerivationCodeSequence = [code]
            ds.SourceImageSequence = [source_item(source)]
            ds.ContributingEquipmentSequence = [equipment]
            ds.SamplesPerPixel = 3 if geometry.colour else 1
            ds.PhotometricInterpretation = "RGB" if geometry.colour else "MONOCHROME2"
            if geometry.colour:
                ds.PlanarConfiguration = 0
            elif "PlanarConfiguration" in ds:
                del ds.PlanarConfiguration
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            if "NumberOfFrames" in source:
                ds.NumberOfFrames = len(slices)
            ds.PixelData = _even(np.ascontiguousarray(stored[slices]).tobytes())
            ds.file_meta = uncompressed_file_meta(ds)
            yield ds

    return instances()


def _even(data: bytes) -> bytes:
    return data + b"\x00" if len(data) % 2 else data
