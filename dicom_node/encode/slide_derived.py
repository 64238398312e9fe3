"""A filter's output over a whole-slide image -> a derived VL Whole Slide Microscopy Image.

Written a tile at a time, never whole: the header (the source's, less what describes its
pixels or its own derivation: ``derived.DROPPED``) is written first, then the Pixel Data
element, then each tile as it is computed, in TILED_FULL order (row-major over the total
pixel matrix, the source's tile size), uncompressed (Explicit VR Little Endian: the
output is as large as the source is uncompressed). Through the node's data-file API, so
it is encrypted at rest when the node encrypts (``security.crypto.EncryptingWriter``), and
written beside its place and renamed into it as the other outputs.

ImageType ``DERIVED\\PRIMARY\\VOLUME\\NONE`` (the IOD's value 2 is PRIMARY only), the
derivation (processor, version, parameters) in DerivationDescription with a
DerivationCodeSequence, the source in SourceImageSequence and the node as contributing
equipment, as ``derived.encode_derived`` does. Colour stays 8-bit RGB; greyscale is 16-bit
MONOCHROME2, its values in the source's units or, for values within 0..1 (an enhancement,
a colour slide's luminance), scaled onto 0..65535, said in DerivationDescription (the IOD
allows RescaleSlope 1 only).
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.encode.common import SERIES_NUMBER, long_string, uncompressed_file_meta
from dicom_node.encode.derived import (
    DEFAULT_DERIVATION,
    DERIVATION_CODES,
    DROPPED,
    processing_equipment,
    source_item,
)
from dicom_node.encode.uids import Provenance
from dicom_node.security.crypto import EncryptingWriter
from dicom_node.security.keys import KeyRing

#: Elements of a slide's header that describe its own tiles or their encoding.
SLIDE_DROPPED = (
    *DROPPED,
    "PerFrameFunctionalGroupsSequence",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PlanarConfiguration",
    "ICCProfile",
    "PresentationLUTShape",
    "RescaleSlope",
    "RescaleIntercept",
)
IMAGE_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
#: (5200,9230) Per-Frame Functional Groups Sequence; a length of "undefined".
PER_FRAME_GROUPS = 0x52009230
UNDEFINED = 0xFFFFFFFF


def derived_slide_header(
    source: Dataset,
    provenance: Provenance,
    key: str,
    *,
    index: int,
    description: str,
    colour: bool,
    slope: float,
    now: dt.datetime | None = None,
) -> Dataset:
    """The derived slide's header (no pixel data): TILED_FULL over the source's matrix."""
    ds = Dataset()
    for element in source:
        if element.keyword not in SLIDE_DROPPED and not element.tag.is_private:
            ds.add(copy.deepcopy(element))
    rows, columns = int(source.TotalPixelMatrixRows), int(source.TotalPixelMatrixColumns)
    down, across = -(-rows // int(source.Rows)), -(-columns // int(source.Columns))
    ds.ImageType = IMAGE_TYPE
    for shared in ds.get("SharedFunctionalGroupsSequence", []):
        for frame_type in shared.get("WholeSlideMicroscopyImageFrameTypeSequence", []):
            frame_type.FrameType = IMAGE_TYPE
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfFrames = down * across
    ds.TotalPixelMatrixFocalPlanes = 1
    paths = ds.get("OpticalPathSequence")
    if paths is not None and len(paths) > 1:
        ds.OpticalPathSequence = DicomSequence([paths[0]])
    ds.NumberOfOpticalPaths = 1
    if colour:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7  # the optical path's ICC profile stays: a filter keeps its colours
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleSlope = "1"  # the IOD's only value: a scaling is told in the derivation
        ds.RescaleIntercept = "0"
        if paths is not None and len(paths):
            for keyword in ("ICCProfile", "ColorSpace"):
                if keyword in ds.OpticalPathSequence[0]:
                    delattr(ds.OpticalPathSequence[0], keyword)
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.SOPInstanceUID = provenance.instance_uid(key, "derived", index, 0)
    ds.SeriesInstanceUID = provenance.series_uid(key, "derived", index)
    ds.SeriesNumber = SERIES_NUMBER["derived"] + index
    ds.InstanceNumber = 1
    ds.SeriesDescription = long_string(description)
    when = now or dt.datetime.now(dt.UTC)
    ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    derivation = f"{description}: {provenance.summary()}"
    if not colour and slope != 1.0:
        derivation += f"; values (0..1) stored as value / {slope:.6g}"
    ds.DerivationDescription = derivation[:1024]
    code = DERIVATION_CODES.get(provenance.family, DEFAULT_DERIVATION)
    ds.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(code)]
    ds.SourceImageSequence = [source_item(source)]
    # Common Instance Reference: the source, in its series (same study).
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence([instance])
    ds.ReferencedSeriesSequence = DicomSequence([series])
    ds.ContributingEquipmentSequence = [processing_equipment(provenance)]
    ds.file_meta = uncompressed_file_meta(ds)
    return ds


def stored_tile(values: npt.NDArray[Any], colour: bool, slope: float) -> npt.NDArray[Any]:
    """A tile's values as stored pixels (8-bit RGB, or 16-bit grey at ``slope``)."""
    if colour:
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    return np.clip(np.rint(values / slope), 0, 65535).astype(np.uint16)


def write_derived_slide(
    path: Path, header: Dataset, tiles: Iterable[npt.NDArray[Any]], keys: KeyRing | None
) -> Path:
    """Write ``header`` and then each stored tile (TILED_FULL order) to ``path``, beside it
    first and renamed into it; encrypted with ``keys`` when given."""
    samples = int(header.SamplesPerPixel)
    frame_bytes = (
        int(header.Rows) * int(header.Columns) * samples * (int(header.BitsAllocated) // 8)
    )
    frames = int(header.NumberOfFrames)

    def chunks() -> Iterator[bytes]:
        count = 0
        for tile in tiles:
            data = np.ascontiguousarray(tile).tobytes()
            if len(data) != frame_bytes:
                raise ValueError(f"a tile of {len(data)} bytes, not {frame_bytes}")
            count += 1
            yield data
        if count != frames:
            raise ValueError(f"{count} tiles written of {frames}")

    vr = b"OB" if int(header.BitsAllocated) == 8 else b"OW"
    return write_with_pixel_data(path, header, vr, frame_bytes * frames, chunks(), keys)


def write_with_pixel_data(
    path: Path,
    header: Dataset,
    vr: bytes,
    length: int,
    chunks: Iterable[bytes],
    keys: KeyRing | None,
    *,
    per_frame_items: Iterable[Dataset] | None = None,
) -> Path:
    """Write ``header`` (no Pixel Data, Explicit VR Little Endian), then the Pixel Data
    element (``vr``, ``length`` bytes) from ``chunks`` as they come, to ``path``: beside it
    first and renamed into it, encrypted with ``keys`` when given (a segment at a time).

    With ``per_frame_items``, the Per-Frame Functional Groups Sequence is written between
    them an item at a time (undefined lengths): the header has none of its own, nor any
    element after it but the Pixel Data."""
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    if per_frame_items is not None:
        late = [e.keyword for e in header if e.tag >= PER_FRAME_GROUPS]
        if late:
            raise ValueError(f"the header holds {', '.join(late)}, written before its frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as sink:
            writer: Any = sink if keys is None else EncryptingWriter(sink, keys)
            writer.write(buffer.getvalue())
            if per_frame_items is not None:
                writer.write(struct.pack("<HH2sHI", 0x5200, 0x9230, b"SQ", 0, UNDEFINED))
                for item in per_frame_items:
                    writer.write(struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED))
                    encoded = DicomBytesIO()
                    encoded.is_little_endian, encoded.is_implicit_VR = True, False
                    write_dataset(encoded, item)
                    writer.write(encoded.getvalue())
                    writer.write(struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
                writer.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
            writer.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length))
            written = 0
            for chunk in chunks:
                writer.write(chunk)
                written += len(chunk)
            if written != length:
                raise ValueError(f"{written} bytes of Pixel Data written of {length}")
            if keys is not None:
                writer.finish()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
