"""A tiled whole-slide image (VL Whole Slide Microscopy Image), read tile by tile.

A slide does not fit in memory at full resolution, so it is never loaded whole: ``Slide``
knows its total pixel matrix (TotalPixelMatrixRows/Columns), where each tile lies in it
(TILED_FULL: row-major order of the frames; TILED_SPARSE: each frame's
PlanePositionSlideSequence), and reads a region by decoding only the frames it covers
(highdicom's ``ImageFileReader``, which seeks to a frame through the Basic or Extended
Offset Table), keeping the last ``cache_tiles`` decoded tiles in an LRU cache. Memory is
the cache and the regions asked for, whatever the slide's size.

- colour: RGB as decoded (the decoders turn YBR into RGB), scaled to [0, 1]; no ICC
  colour correction (that is for display); greyscale: stored values (MONOCHROME1
  inverted so that bright means more signal).
- pixel spacing: SharedFunctionalGroupsSequence > PixelMeasuresSequence > PixelSpacing
  (mm), else the image's ImagedVolumeWidth/Height over the matrix; else none (areas in
  pixels).
- a series that holds a pyramid: the VOLUME image with the largest total pixel matrix is
  processed; the other levels and the LABEL / OVERVIEW / THUMBNAIL images are ignored,
  saying so (``choose_level``). Only the first focal plane and optical path are read.
- tiles a sparse slide does not have read as its padding value (PixelPaddingValue, else
  white for colour and 0 for greyscale).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from highdicom.io import ImageFileReader
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike

from dicom_node.security.crypto import open_data_file
from dicom_node.security.keys import KeyRing
from dicom_node.volume import SeriesError
from processors.base import Volume

SLIDE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Decoded tiles kept (a 256x256 RGB tile is 192 KiB: 256 of them are 48 MiB).
DEFAULT_CACHE_TILES = 256
#: ImageType value 3 of the images of a slide that are not the tissue at some resolution.
NOT_A_LEVEL = ("LABEL", "OVERVIEW", "THUMBNAIL")


class SlideError(SeriesError):
    """The instances are not a whole-slide image this node can read; the message says why."""


def is_slide(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) == SLIDE_SOP_CLASS


def _flavour(ds: Dataset) -> str:
    """ImageType's third value (VOLUME, LABEL, OVERVIEW, THUMBNAIL), or ''."""
    image_type = ds.get("ImageType") or []
    values = [str(v) for v in image_type] if not isinstance(image_type, str) else [image_type]
    return values[2].upper() if len(values) > 2 else ""


def _matrix(ds: Dataset) -> tuple[int, int]:
    rows = ds.get("TotalPixelMatrixRows", ds.get("Rows", 0))
    columns = ds.get("TotalPixelMatrixColumns", ds.get("Columns", 0))
    return int(rows or 0), int(columns or 0)


@dataclass(frozen=True)
class LevelChoice:
    """The instance of a slide series that is processed, and what was left out."""

    path: Path
    header: Dataset
    ignored: tuple[str, ...]


def choose_level(instances: Sequence[tuple[Path, Dataset]]) -> LevelChoice:
    """The highest-resolution level of a slide series: among the VOLUME images (or, where
    none says so, those that are not LABEL/OVERVIEW/THUMBNAIL), the largest total pixel
    matrix. The other instances are listed in ``ignored`` (counted, never named by UID)."""
    slides = [(path, ds) for path, ds in instances if is_slide(ds)]
    if not slides:
        raise SlideError("no VL Whole Slide Microscopy Image among the instances")
    levels = [(p, ds) for p, ds in slides if _flavour(ds) == "VOLUME"] or [
        (p, ds) for p, ds in slides if _flavour(ds) not in NOT_A_LEVEL
    ]
    if not levels:
        raise SlideError(
            "the series holds only LABEL/OVERVIEW/THUMBNAIL images of the slide, no tissue level"
        )
    path, header = max(levels, key=lambda item: (_matrix(item[1]), str(item[0])))
    rows, columns = _matrix(header)
    ignored: list[str] = []
    for flavour in NOT_A_LEVEL:
        count = sum(1 for _, ds in slides if _flavour(ds) == flavour)
        if count:
            ignored.append(f"{count} {flavour} image(s) of the slide ignored")
    lower = sum(1 for _, ds in levels if _matrix(ds) < (rows, columns))
    if lower:
        ignored.append(
            f"{lower} lower-resolution pyramid level(s) ignored: the {rows}x{columns} level "
            "is processed"
        )
    same = sum(1 for p, ds in levels if _matrix(ds) == (rows, columns)) - 1
    if same:
        ignored.append(
            f"{same} other instance(s) at {rows}x{columns} (focal planes, optical paths or a "
            "concatenation) ignored"
        )
    others = len(instances) - len(slides)
    if others:
        ignored.append(f"{others} instance(s) that are not whole-slide images ignored")
    return LevelChoice(path, header, tuple(ignored))


def slide_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) pixel spacing in mm from the shared pixel measures, or None."""
    try:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        rows, columns = _matrix(ds)
        width, height = ds.get("ImagedVolumeWidth"), ds.get("ImagedVolumeHeight")
        if not (width and height and rows and columns):
            return None
        spacing = (float(height) / rows, float(width) / columns)
    return spacing if min(spacing) > 0 else None


def _tile_positions(ds: Dataset, tile: tuple[int, int]) -> tuple[dict[tuple[int, int], int], str]:
    """Frame index of each tile (tile row, tile column) of the first focal plane and optical
    path, and a note on what was left out ('' when nothing)."""
    rows, columns = _matrix(ds)
    down, across = -(-rows // tile[0]), -(-columns // tile[1])
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    organisation = str(ds.get("DimensionOrganizationType", "") or "")
    if organisation == "TILED_FULL" or not per_frame:
        if frames < down * across:
            raise SlideError(
                f"{frames} frames for a {down}x{across} grid of tiles (TILED_FULL needs them all)"
            )
        extra = frames > down * across
        note = "only the first focal plane / optical path is read" if extra else ""
        return {(i // across, i % across): i for i in range(down * across)}, note
    positions: dict[tuple[int, int], int] = {}
    first_plane: tuple[Any, Any] | None = None
    left_out = 0
    for index, group in enumerate(per_frame):
        try:
            place = group.PlanePositionSlideSequence[0]
            row = int(place.RowPositionInTotalImagePixelMatrix) - 1
            column = int(place.ColumnPositionInTotalImagePixelMatrix) - 1
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise SlideError(f"frame {index + 1}: no position in the total pixel matrix") from exc
        plane = (place.get("ZOffsetInSlideCoordinateSystem"), _optical_path(group))
        first_plane = plane if first_plane is None else first_plane
        if plane != first_plane:
            left_out += 1
            continue
        if row % tile[0] or column % tile[1]:
            raise SlideError(
                f"frame {index + 1} lies at ({row + 1}, {column + 1}), off the grid of "
                f"{tile[0]}x{tile[1]} tiles: tiles that overlap are not supported"
            )
        positions.setdefault((row // tile[0], column // tile[1]), index)
    note = f"{left_out} frame(s) of other focal planes / optical paths ignored" if left_out else ""
    return positions, note


def _optical_path(group: Dataset) -> str:
    try:
        return str(group.OpticalPathIdentificationSequence[0].OpticalPathIdentifier)
    except (AttributeError, IndexError):
        return ""


class Slide:
    """One whole-slide image instance, read a region at a time through a tile cache.

    Use as a context manager (or call ``close``): the file stays open while it is read.
    ``read_region(top, left, height, width)`` returns float32 pixels, (h, w) or (h, w, 3).
    """

    def __init__(
        self, path: Path, keys: KeyRing | None = None, cache_tiles: int = DEFAULT_CACHE_TILES
    ) -> None:
        if cache_tiles < 1:
            raise ValueError("the tile cache holds at least one tile")
        self.path = path
        self.cache_tiles = cache_tiles
        self._stream = open_data_file(path, keys)
        # highdicom warns of a colour image without an ICC profile: tiles are read without
        # colour correction (that is for display), so it does not matter here.
        reader_log = logging.getLogger("highdicom.io")
        level = reader_log.level
        reader_log.setLevel(logging.ERROR)
        try:
            self._reader = ImageFileReader(DicomFileLike(self._stream))
            self._reader.open()
            header = self._reader.metadata
        except Exception as exc:  # an unreadable header, no pixel data, deflated syntax
            self._stream.close()
            raise SlideError(f"{path.name}: not a readable tiled image: {exc}") from exc
        finally:
            reader_log.setLevel(level)
        if not is_slide(header):
            self._stream.close()
            raise SlideError(f"{path.name}: not a VL Whole Slide Microscopy Image")
        self.header: Dataset = header
        self.rows, self.columns = _matrix(header)
        self.tile_shape = (int(header.Rows), int(header.Columns))
        self.colour = int(header.get("SamplesPerPixel", 1) or 1) == 3
        if not self.colour and int(header.get("SamplesPerPixel", 1) or 1) != 1:
            self._stream.close()
            raise SlideError(f"{header.SamplesPerPixel} samples per pixel: RGB or grey only")
        try:
            self._tiles, self.note = _tile_positions(header, self.tile_shape)
        except SlideError:
            self._stream.close()
            raise
        self.spacing = slide_spacing(header)
        bits = int(header.get("BitsStored", 8) or 8)
        self._top = float(2**bits - 1)
        self._invert = str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1"
        padding = header.get("PixelPaddingValue")
        if padding is not None:
            self.fill = self._values(np.asarray([padding]))[0]
        else:
            self.fill = np.float32(1.0 if self.colour else 0.0)
        self._cache: OrderedDict[int, npt.NDArray[Any]] = OrderedDict()
        self.decoded = 0  # frames decoded (cache misses)
        self.hits = 0

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._cache.clear()
        self._reader.close()
        self._stream.close()

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.columns

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def tile_count(self) -> int:
        return len(self._tiles)

    @property
    def cached(self) -> int:
        return len(self._cache)

    def _values(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        values = raw.astype(np.float32)
        if self.colour:
            return values / np.float32(self._top)
        return np.float32(self._top) - values if self._invert else values

    def _frame(self, index: int) -> npt.NDArray[Any]:
        tile = self._cache.get(index)
        if tile is not None:
            self._cache.move_to_end(index)
            self.hits += 1
            return tile
        try:
            tile = self._reader.read_frame(index, correct_color=False)
        except Exception as exc:  # corrupt stream, missing decoder
            syntax = self._reader.transfer_syntax_uid
            raise SlideError(f"frame {index + 1}: cannot decode ({syntax}): {exc}") from exc
        self.decoded += 1
        self._cache[index] = tile
        while len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def read_region(self, top: int, left: int, height: int, width: int) -> npt.NDArray[np.float32]:
        """Pixels [top:top+height, left:left+width] of the total pixel matrix (inside it)."""
        if top < 0 or left < 0 or top + height > self.rows or left + width > self.columns:
            raise ValueError(
                f"region ({top}, {left}) {height}x{width} outside the {self.rows}x"
                f"{self.columns} slide"
            )
        shape = (height, width, 3) if self.colour else (height, width)
        out = np.full(shape, self.fill, dtype=np.float32)
        tile_rows, tile_columns = self.tile_shape
        for tile_row in range(top // tile_rows, -(-(top + height) // tile_rows)):
            for tile_column in range(left // tile_columns, -(-(left + width) // tile_columns)):
                index = self._tiles.get((tile_row, tile_column))
                if index is None:
                    continue
                y0, x0 = tile_row * tile_rows, tile_column * tile_columns
                ys, ye = max(top, y0), min(top + height, y0 + tile_rows)
                xs, xe = max(left, x0), min(left + width, x0 + tile_columns)
                tile = self._frame(index)
                out[ys - top : ye - top, xs - left : xe - left] = self._values(
                    tile[ys - y0 : ye - y0, xs - x0 : xe - x0]
                )
        return out

    def geometry(self) -> Volume:
        """The slide as a planar one-frame ``Volume`` without pixels (a read-only zero
        view: no memory), for the encoders and the processors' ``accepts``."""
        header = self.header
        shape = (1, self.rows, self.columns, 3) if self.colour else (1, self.rows, self.columns)
        spacing = self.spacing
        return Volume(
            array=np.broadcast_to(np.float32(0), shape),
            spacing=(1.0, *(spacing or (1.0, 1.0))),
            modality=str(header.get("Modality", "SM") or "SM"),
            sop_instance_uids=(self.sop_instance_uid,),
            series_instance_uid=_optional(header, "SeriesInstanceUID"),
            study_instance_uid=_optional(header, "StudyInstanceUID"),
            frame_of_reference_uid=_optional(header, "FrameOfReferenceUID"),
            planar=True,
            spacing_known=spacing is not None,
            spacing_note="" if spacing else "no pixel measures in the slide's header",
        )


def _optional(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None
