"""Load 2-D images into a planar ``processors.base.Volume`` (this module does the I/O).

Beside ``dicom_node.volume`` (a series that is one regular 3-D volume): a single 2-D image
(CR, DX, MG, a photo, an ultrasound frame) and a stack of frames without geometry (a cine
loop, a multi-frame US or XA, single-frame images of one series with the same size), in
greyscale or colour. The pixel semantics are pydicom's, not hand-made:

- greyscale: ``apply_modality_lut`` (RescaleSlope/Intercept or a Modality LUT Sequence);
  MONOCHROME1 is inverted within the modality LUT's output range, so that bright means
  dense for every processor, and the header's first window (WindowCenter/Width) is kept,
  inverted alike, for ``window``'s ``header`` preset (else its VOI LUT, as pydicom's
  ``apply_voi_lut``, on MONOCHROME2);
- colour: RGB as decoded (pydicom converts YBR_FULL/YBR_FULL_422 to RGB, the JPEG 2000
  decoders undo YBR_ICT/RCT), ``apply_color_lut`` for PALETTE COLOR, scaled to [0, 1];
- pixel spacing: ``PixelSpacing``; else ``ImagerPixelSpacing``, which is at the detector:
  divided by ``EstimatedRadiographicMagnificationFactor`` when the header has one, and
  said to be "at the detector" (``Volume.spacing_note``) when it has not; else an
  ultrasound image's calibrated 2-D regions when they agree (``ultrasound_spacing``);
  else none (areas in pixels).

Whole-slide microscopy (tiled, VL Whole Slide Microscopy Image) is not loaded here: it is
processed tile by tile (``dicom_node.slide``, ``dicom_node.slide_process``). A file
without File Meta or preamble is read with ``force=True`` when it has an image's header,
its transfer syntax taken from how it was encoded (``read_image_file``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.security.crypto import read_dicom
from dicom_node.security.keys import KeyRing
from dicom_node.volume import SeriesError, datasets_to_volume, decode_pixels
from processors.base import VoiLut, Volume

WHOLE_SLIDE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class ImageError(SeriesError):
    """The instances are not an image this node can load; the message says why."""


def with_transfer_syntax(ds: Dataset) -> Dataset:
    """``ds`` with a File Meta transfer syntax: a file read without one (no File Meta, or
    a File Meta that lacks it) gets the syntax it was read in, so its pixels decode."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return ds


def read_image_file(path: Path, keys: KeyRing | None = None, **options: Any) -> Dataset:
    """``read_dicom``, and for a file without File Meta or preamble the same with
    ``force=True``, accepted only when it has an image's header (SOP class, rows)."""
    try:
        ds = read_dicom(path, keys, **options)
    except InvalidDicomError:
        ds = read_dicom(path, keys, force=True, **options)
        if "SOPClassUID" not in ds or "Rows" not in ds:
            raise InvalidDicomError(f"{path}: no DICOM preamble, and not an image") from None
    return with_transfer_syntax(ds)


def is_planar(datasets: Sequence[Dataset]) -> bool:
    """True when the instances are 2-D images rather than slices of one volume: colour,
    multi-frame without functional groups, or not one of them with the geometry that
    places a slice in the patient (a series where only some lack it is a broken volume,
    and ``dicom_node.volume`` says which)."""
    placed = False
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            return True
        if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
            return True
        if "PerFrameFunctionalGroupsSequence" in ds:
            placed = True
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return True
        placed = placed or any(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient"))
    return not placed


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
    """(row, column) spacing in mm at the patient where the header says it, and a note."""
    spacing = _pair(ds.get("PixelSpacing"))
    if spacing is not None:
        return spacing, ""
    imager = _pair(ds.get("ImagerPixelSpacing"))
    if imager is not None:
        factor = ds.get("EstimatedRadiographicMagnificationFactor")
        if factor is not None and float(factor) > 0:
            return (
                (float(imager[0]) / float(factor), float(imager[1]) / float(factor)),
                "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor",
            )
        return imager, "at the detector"
    regions = ds.get("SequenceOfUltrasoundRegions")
    if regions:
        return ultrasound_spacing(regions, int(ds.Rows), int(ds.Columns))
    return None, "no (usable) pixel spacing in the header"


#: Ultrasound region values (PS3.3 C.8.5.5.1): a 2-D tissue or flow region, in cm.
US_REGION_2D = 1
US_UNITS_CM = 3


def ultrasound_spacing(
    regions: Sequence[Dataset], rows: int, columns: int
) -> tuple[tuple[float, float] | None, str]:
    """(row, column) spacing in mm from an ultrasound image's calibrated regions, and a note.

    The 2-D regions (RegionSpatialFormat 1) with both physical units in cm count (an
    M-mode, Doppler or waveform region measures time or velocity on one axis). They give
    the spacing when they agree: one region, or all with the same PhysicalDeltaX/Y. When
    they disagree, which one a segment lies in decides its area, so none is used (areas
    in pixels, said so), nor when a region reaches outside the image (a resized image
    whose regions describe another pixel matrix).
    """
    spatial = [
        region
        for region in regions
        if int(region.get("RegionSpatialFormat", 0) or 0) == US_REGION_2D
        and int(region.get("PhysicalUnitsXDirection", 0) or 0) == US_UNITS_CM
        and int(region.get("PhysicalUnitsYDirection", 0) or 0) == US_UNITS_CM
    ]
    if not spatial:
        return None, "ultrasound regions without a 2-D region in cm: areas in pixels"
    deltas: set[tuple[float, float]] = set()
    for region in spatial:
        pair = _pair([region.get("PhysicalDeltaY"), region.get("PhysicalDeltaX")])
        if pair is None:
            return None, "an ultrasound region without a usable PhysicalDeltaX/Y: areas in pixels"
        right, bottom = region.get("RegionLocationMaxX1"), region.get("RegionLocationMaxY1")
        # Some devices write the end one past the last pixel: that much is tolerated.
        if right is None or bottom is None or int(right) > columns or int(bottom) > rows:
            return None, "an ultrasound region reaches outside the image: areas in pixels"
        deltas.add((round(pair[0] * 10.0, 9), round(pair[1] * 10.0, 9)))
    if len(deltas) > 1:
        return None, (
            f"{len(spatial)} ultrasound regions with different spacings (which one applies "
            "depends on where a segment lies): areas in pixels"
        )
    (spacing,) = deltas
    count = "one region" if len(spatial) == 1 else f"{len(spatial)} regions, the same spacing"
    return spacing, f"SequenceOfUltrasoundRegions PhysicalDeltaX/Y in cm ({count})"


def _pair(value: Any) -> tuple[float, float] | None:
    """Two positive numbers, or None (absent, zero, malformed)."""
    try:
        pair = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
    except (TypeError, ValueError):
        return None
    return pair if pair is not None and min(pair) > 0 else None


def _first(value: Any) -> float | None:
    """The first of a (possibly multi-valued) number, or None."""
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _voi_lut(ds: Dataset) -> VoiLut | None:
    """The header's first VOI LUT (MONOCHROME2 only: its input is not inverted)."""
    sequence = ds.get("VOILUTSequence")
    if not sequence or str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME2":
        return None
    item = sequence[0]
    descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
    if descriptor is None or data is None or len(descriptor) != 3:
        return None
    entries = tuple(int(v) for v in (data if isinstance(data, MultiValue | list) else [data]))
    return VoiLut(first=int(descriptor[1]), entries=entries, bits=int(descriptor[2]))


def _grey(ds: Dataset, stored: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float32], Any]:
    """Modality-LUT values (bright = dense) and the header's window in those values."""
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    window = (centre, width) if centre is not None and width is not None and width > 0 else None
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        ends = np.asarray(apply_modality_lut(np.array([low, high]), ds), dtype=np.float64)
        total = float(ends.min() + ends.max())
        values = np.float32(total) - values
        if window is not None:
            window = (total - window[0], window[1])
    return values, window


def _colour(ds: Dataset, decoded: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """RGB in [0, 1]: a palette through its lookup table, YBR already RGB (pydicom)."""
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        rgb = apply_color_lut(decoded, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(descriptor[2]) if descriptor is not None else 8
        top = float(2**bits - 1)
    else:
        rgb = decoded
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
    return (np.asarray(rgb, dtype=np.float32) / np.float32(top)).astype(np.float32)


def datasets_to_image(datasets: Sequence[Dataset]) -> Volume:
    """The planar Volume of one series' 2-D images: the frames of a multi-frame instance,
    or single-frame instances of the same size in InstanceNumber order."""
    if not datasets:
        raise ImageError("no instances")
    for ds in datasets:
        if str(ds.get("SOPClassUID", "")) == WHOLE_SLIDE_SOP_CLASS:
            raise ImageError(
                "whole-slide microscopy (tiled VL Whole Slide Microscopy Image) is not loaded "
                "whole: it is processed tile by tile (dicom_node.slide_process)"
            )
    if len(datasets) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise ImageError(
            f"{len(datasets)} instances of which some are multi-frame in one series: "
            "a stack of 2-D images is one multi-frame instance or single-frame instances"
        )
    ordered = sorted(
        datasets,
        key=lambda ds: (int(ds.get("InstanceNumber", 0) or 0), str(ds.get("SOPInstanceUID", ""))),
    )
    first = ordered[0]
    colour = int(first.get("SamplesPerPixel", 1) or 1) == 3 or (
        str(first.get("PhotometricInterpretation", "")) == "PALETTE COLOR"
    )
    shape = (int(first.Rows), int(first.Columns))
    frames: list[npt.NDArray[np.float32]] = []
    uids: list[str] = []
    frame_numbers: list[int] = []
    window = None
    for ds in ordered:
        uid = str(ds.get("SOPInstanceUID", ""))
        where = f"instance {uid}"
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ImageError(
                f"images of different sizes in one series ({shape[0]}x{shape[1]} and "
                f"{ds.Rows}x{ds.Columns}): process them as separate series"
            )
        this_colour = int(ds.get("SamplesPerPixel", 1) or 1) == 3 or (
            str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR"
        )
        if this_colour != colour:
            raise ImageError("colour and greyscale images in one series")
        decoded = decode_pixels(ds, where)
        count = int(ds.get("NumberOfFrames", 1) or 1)
        if count == 1:
            decoded = decoded[None]
        if colour:
            frames.append(_colour(ds, decoded))
        else:
            values, window = _grey(ds, decoded)
            frames.append(values)
        uids += [uid] * count
        if count > 1:
            frame_numbers += list(range(1, count + 1))
    array = np.concatenate(frames) if len(frames) > 1 else frames[0]
    spacing, note = _spacing(first)
    return Volume(
        array=np.ascontiguousarray(array, dtype=np.float32),
        spacing=(1.0, *(spacing or (1.0, 1.0))),
        modality=str(first.get("Modality", "OT") or "OT"),
        sop_instance_uids=tuple(uids),
        source_frame_numbers=tuple(frame_numbers),
        series_instance_uid=_optional(first, "SeriesInstanceUID"),
        study_instance_uid=_optional(first, "StudyInstanceUID"),
        frame_of_reference_uid=_optional(first, "FrameOfReferenceUID"),
        planar=True,
        spacing_known=spacing is not None,
        spacing_note=note,
        window=window,
        voi_lut=None if colour else _voi_lut(first),
    )


def _optional(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def datasets_to_image_or_volume(datasets: Sequence[Dataset]) -> Volume:
    """A series as a 3-D volume when its instances place their slices in the patient and
    are greyscale (``dicom_node.volume``), else as 2-D images (``datasets_to_image``)."""
    if is_planar(datasets):
        return datasets_to_image(datasets)
    return datasets_to_volume(datasets)
