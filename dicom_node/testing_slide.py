"""Generated tiled whole-slide images with known truth, for tests and benchmarks.

``write_disc_slide`` writes a VL Whole Slide Microscopy Image (uncompressed, TILED_FULL or
TILED_SPARSE) of discs on glass, a tile at a time (a slide of any size is written without
holding it in memory); ``Disc.pixels`` and ``disc_truth`` give each disc's exact pixels,
so that areas and Dice are checked against the truth.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.slide import SLIDE_SOP_CLASS

#: Brightfield glass, and two stains (a pink eosin-like and a purple haematoxylin-like).
GLASS = (236, 234, 240)
STAINS = ((214, 120, 170), (110, 70, 160))
GLASS_GREY = 40
STAIN_GREY = (900, 1800)


@dataclass(frozen=True)
class Disc:
    """A disc of stain ``stain`` (0 or 1) centred at (row, column), radius in pixels."""

    row: float
    column: float
    radius: float
    stain: int = 0

    def inside(
        self, rows: npt.NDArray[np.float64], columns: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.bool_]:
        return (rows - self.row) ** 2 + (columns - self.column) ** 2 <= self.radius**2

    @property
    def pixels(self) -> int:
        """How many pixel centres the disc covers (its exact area in pixels)."""
        top, bottom = math.floor(self.row - self.radius), math.ceil(self.row + self.radius)
        left, right = math.floor(self.column - self.radius), math.ceil(self.column + self.radius)
        rows, columns = np.mgrid[top : bottom + 1, left : right + 1].astype(np.float64)
        return int(self.inside(rows, columns).sum())


def grid_of_discs(rows: int, columns: int, pitch: int, radius: float) -> list[Disc]:
    """Discs on a grid ``pitch`` pixels apart, alternating stains."""
    discs = []
    for i, row in enumerate(range(pitch // 2, rows - int(radius), pitch)):
        for j, column in enumerate(range(pitch // 2, columns - int(radius), pitch)):
            discs.append(Disc(row + 0.3, column + 0.7, radius, (i + j) % 2))
    return discs


def disc_truth(
    discs: Sequence[Disc], top: int, left: int, height: int, width: int
) -> npt.NDArray[np.int16]:
    """The stain + 1 of each pixel of the region (0: glass)."""
    rows, columns = np.mgrid[top : top + height, left : left + width].astype(np.float64)
    truth = np.zeros((height, width), dtype=np.int16)
    for disc in discs:
        if (
            disc.row + disc.radius < top
            or disc.row - disc.radius >= top + height
            or disc.column + disc.radius < left
            or disc.column - disc.radius >= left + width
        ):
            continue
        truth[disc.inside(rows, columns)] = disc.stain + 1
    return truth


def _tile(
    discs: Sequence[Disc],
    top: int,
    left: int,
    shape: tuple[int, int],
    colour: bool,
    noise: float,
    seed: int,
) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    truth = disc_truth(discs, top, left, *shape)
    rng = np.random.default_rng([seed, top, left])
    if colour:
        palette = np.array([GLASS, *STAINS], dtype=np.float32)
        values = palette[truth] + rng.normal(0.0, noise, (*shape, 3)).astype(np.float32)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    grey = np.array([GLASS_GREY, *STAIN_GREY], dtype=np.float32)
    values = grey[truth] + rng.normal(0.0, noise * 8, shape).astype(np.float32)
    return np.clip(np.rint(values), 0, 4095).astype(np.uint16)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def slide_header(
    rows: int,
    columns: int,
    tile: int,
    colour: bool,
    spacing_mm: float,
    seed: int,
    positions: Sequence[tuple[int, int]] | None,
    image_type: str = "VOLUME",
) -> Dataset:
    """The header of a generated slide (``positions``: the tiles of a TILED_SPARSE one)."""

    def uid(what: str) -> UID:
        return generate_uid(entropy_srcs=[str(seed), what])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SLIDE_SOP_CLASS)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = SLIDE_SOP_CLASS
    ds.SOPInstanceUID = uid(f"image-{image_type}-{rows}x{columns}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.StudyDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20260101120000"
    ds.AccessionNumber = "PHANTOM1"
    ds.Modality = "SM"
    ds.Manufacturer = "dicom-node"
    ds.ManufacturerModelName = "disc phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "testing_slide"
    ds.ReferringPhysicianName = ""
    ds.VolumetricProperties = "VOLUME"
    ds.PatientName = "Phantom^Discs"
    ds.PatientID = "PHANTOM"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = uid("frame-of-reference")
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.ContainerIdentifier = "PHANTOM-SLIDE"
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence()
    ds.ContainerTypeCodeSequence = DicomSequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier = "PHANTOM-SPECIMEN"
    specimen.SpecimenUID = uid("specimen")
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence()
    specimen.SpecimenPreparationSequence = DicomSequence()
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    ds.AcquisitionContextSequence = DicomSequence()
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if colour else 16
    ds.BitsStored = 8 if colour else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rows, columns
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth = columns * spacing_mm
    ds.ImagedVolumeHeight = rows * spacing_mm
    ds.ImagedVolumeDepth = 0.01
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    path = Dataset()
    path.IlluminationTypeCodeSequence = DicomSequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    path.OpticalPathIdentifier = "1"
    path.IlluminationColorCodeSequence = DicomSequence([_code("414298005", "SCT", "Full Spectrum")])
    ds.OpticalPathSequence = DicomSequence([path])
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    measures.SliceThickness = 0.01
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    organisation = Dataset()
    organisation.DimensionOrganizationUID = uid("dimensions")
    ds.DimensionOrganizationSequence = DicomSequence([organisation])
    ds.DimensionOrganizationType = "TILED_FULL" if positions is None else "TILED_SPARSE"
    down, across = -(-rows // tile), -(-columns // tile)
    if positions is None:
        ds.NumberOfFrames = down * across
    else:
        ds.NumberOfFrames = len(positions)
        groups = []
        for row, column in positions:
            place = Dataset()
            place.RowPositionInTotalImagePixelMatrix = row + 1
            place.ColumnPositionInTotalImagePixelMatrix = column + 1
            # ImageOrientationSlide (0,-1,0,-1,0,0): rows run along -Y, columns along -X.
            place.XOffsetInSlideCoordinateSystem = round(20.0 - column * spacing_mm, 6)
            place.YOffsetInSlideCoordinateSystem = round(40.0 - row * spacing_mm, 6)
            place.ZOffsetInSlideCoordinateSystem = 0.0
            group = Dataset()
            group.PlanePositionSlideSequence = DicomSequence([place])
            groups.append(group)
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    return ds


def _tiles_of(rows: int, columns: int, tile: int) -> Iterator[tuple[int, int]]:
    for top in range(0, rows, tile):
        for left in range(0, columns, tile):
            yield top, left


def write_disc_slide(
    path: Path,
    *,
    rows: int,
    columns: int,
    discs: Sequence[Disc],
    tile: int = 256,
    colour: bool = True,
    spacing_mm: float = 0.0005,
    sparse: bool = False,
    noise: float = 6.0,
    seed: int = 0,
    image_type: str = "VOLUME",
) -> Dataset:
    """Write the slide to ``path`` a tile at a time; returns its header (no pixels).

    ``sparse``: TILED_SPARSE, leaving out the tiles that hold no disc (read as padding).
    """
    tiles = list(_tiles_of(rows, columns, tile))
    positions = None
    if sparse:
        positions = [
            (top, left) for top, left in tiles if disc_truth(discs, top, left, tile, tile).any()
        ]
        tiles = positions
    header = slide_header(rows, columns, tile, colour, spacing_mm, seed, positions, image_type)
    if sparse:
        header.PixelPaddingValue = 255 if colour else 0
    header.save_as(path, enforce_file_format=True)
    samples = 3 if colour else 1
    frame_bytes = tile * tile * samples * (1 if colour else 2)
    length = frame_bytes * len(tiles)
    with path.open("ab") as sink:
        # Pixel Data, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
        sink.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB" if colour else b"OW", 0, length))
        for top, left in tiles:
            sink.write(_tile(discs, top, left, (tile, tile), colour, noise, seed).tobytes())
        if length % 2:
            sink.write(b"\x00")
    return header
