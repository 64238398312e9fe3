"""Load one DICOM series into a ``processors.base.Volume`` (this module does the I/O).

Single-frame series (CT, MR, ...) and enhanced multi-frame CT/MR (one instance, geometry
in the functional groups) are supported; compressed transfer syntaxes are decoded through
pydicom's pixel decoders (pylibjpeg for JPEG, JPEG-LS, JPEG 2000 and RLE). Slices are
ordered by their position projected on the slice normal (never by InstanceNumber), values
are rescaled to physical units (HU for CT), and a series that is not one regular volume is
refused with a ``SeriesError`` that says why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from dicom_node.security.crypto import read_dicom
from dicom_node.security.keys import KeyRing
from processors.base import Volume
from processors.errors import BadInputError

#: Cosines closer than this are "the same orientation".
ORIENTATION_TOLERANCE = 1e-4
#: Relative deviation of one slice gap from the median gap that counts as irregular.
SPACING_TOLERANCE = 0.1


class SeriesError(BadInputError):
    """The instances do not form one regular 3-D volume; the message says why."""


@dataclass(frozen=True)
class _Frame:
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    slope: float
    intercept: float
    sop_instance_uid: str
    source: int  # index of the dataset
    frame: int | None  # frame number (0-based) inside a multi-frame instance
    thickness: float | None


def _floats(value: Any, count: int, what: str, where: str) -> npt.NDArray[np.float64]:
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where}: {what} is not numeric") from exc
    if array.shape != (count,):
        raise SeriesError(f"{where}: {what} has {array.size} values, not {count}")
    return array


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    sequence = ds.get(keyword)
    if sequence is None or len(sequence) == 0:
        return None
    item: Dataset = sequence[0]
    return item


def _functional(
    frame_group: Dataset | None, shared: Dataset | None, sequence: str, keyword: str
) -> Any:
    """A value from the per-frame functional group, else from the shared one."""
    for group in (frame_group, shared):
        if group is None:
            continue
        item = _item(group, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _single_frame(ds: Dataset, index: int) -> _Frame:
    uid = str(ds.get("SOPInstanceUID", f"#{index}"))
    where = f"instance {uid}"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword not in ds:
            raise SeriesError(f"{where}: no {keyword}, so it cannot be placed in a volume")
    spacing = _floats(ds.PixelSpacing, 2, "PixelSpacing", where)
    thickness = ds.get("SliceThickness")
    return _Frame(
        position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where),
        orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        shape=(int(ds.Rows), int(ds.Columns)),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        sop_instance_uid=uid,
        source=index,
        frame=None,
        thickness=float(thickness) if thickness not in (None, "") else None,
    )


def _multi_frame(ds: Dataset, index: int) -> list[_Frame]:
    uid = str(ds.get("SOPInstanceUID", f"#{index}"))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != count:
        raise SeriesError(
            f"instance {uid}: multi-frame without one PerFrameFunctionalGroupsSequence item "
            f"per frame ({count} frames), so its frames cannot be placed in a volume"
        )
    frames = []
    for number in range(count):
        group = per_frame[number]
        where = f"instance {uid} frame {number + 1}"
        position = _functional(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(
            group, shared, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = _functional(group, shared, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise SeriesError(f"{where}: no plane position, orientation or pixel spacing")
        thickness = _functional(group, shared, "PixelMeasuresSequence", "SliceThickness")
        slope = _functional(group, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(
            group, shared, "PixelValueTransformationSequence", "RescaleIntercept"
        )
        if slope is None:
            slope = ds.get("RescaleSlope", 1.0)
        if intercept is None:
            intercept = ds.get("RescaleIntercept", 0.0)
        pixel_spacing = _floats(spacing, 2, "PixelSpacing", where)
        frames.append(
            _Frame(
                position=_floats(position, 3, "ImagePositionPatient", where),
                orientation=_floats(orientation, 6, "ImageOrientationPatient", where),
                pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
                shape=(int(ds.Rows), int(ds.Columns)),
                slope=float(slope or 1.0),
                intercept=float(intercept or 0.0),
                sop_instance_uid=uid,
                source=index,
                frame=number,
                thickness=float(thickness) if thickness not in (None, "") else None,
            )
        )
    return frames


def _check_consistent(frames: Sequence[_Frame]) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if frame.shape != first.shape:
            raise SeriesError(
                f"inconsistent image sizes: {first.shape[0]}x{first.shape[1]} "
                f"({first.sop_instance_uid}) and {frame.shape[0]}x{frame.shape[1]} "
                f"({frame.sop_instance_uid})"
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise SeriesError(
                f"inconsistent pixel spacing: {first.pixel_spacing} and {frame.pixel_spacing}"
            )
        if np.abs(frame.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise SeriesError(
                "mixed orientations: "
                f"{[round(v, 4) for v in first.orientation]} ({first.sop_instance_uid}) and "
                f"{[round(v, 4) for v in frame.orientation]} ({frame.sop_instance_uid})"
            )


def _slice_normal(orientation: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise SeriesError(f"ImageOrientationPatient {list(orientation)} is degenerate")
    return normal / norm


def _order(frames: Sequence[_Frame]) -> tuple[list[_Frame], float]:
    """Frames sorted along the normal, and the slice spacing; refuses gaps and duplicates."""
    normal = _slice_normal(frames[0].orientation)
    distances = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(distances, kind="stable")
    ordered = [frames[i] for i in order]
    if len(ordered) == 1:
        thickness = ordered[0].thickness
        return ordered, thickness if thickness and thickness > 0 else 1.0
    gaps = np.diff(distances[order])
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise SeriesError(
            f"two slices at the same position ({distances[order][k]:.3f} mm along the normal): "
            f"{ordered[k].sop_instance_uid} and {ordered[k + 1].sop_instance_uid}; "
            "more than one stack or time point in this series"
        )
    spacing = float(np.median(gaps))
    deviation = np.abs(gaps - spacing) / spacing
    if np.any(deviation > SPACING_TOLERANCE):
        k = int(np.argmax(deviation))
        missing = round(gaps[k] / spacing) - 1
        what = f"about {missing} missing slice(s)" if missing >= 1 else "an irregular slice gap"
        raise SeriesError(
            f"{what}: gap of {gaps[k]:.3f} mm between {ordered[k].sop_instance_uid} and "
            f"{ordered[k + 1].sop_instance_uid}, where the series' spacing is {spacing:.3f} mm"
        )
    # In-plane offsets must be the same for all slices (no shear / gantry tilt).
    offsets = np.array([f.position - np.dot(f.position, normal) * normal for f in ordered])
    tolerance = max(0.5 * min(ordered[0].pixel_spacing), 0.05)
    if np.abs(offsets - offsets[0]).max() > tolerance:
        raise SeriesError("slice positions are not along the slice normal (tilted or sheared)")
    return ordered, spacing


def _pixels(ds: Dataset, where: str) -> npt.NDArray[Any]:
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(f"{where}: colour images are not volumes (SamplesPerPixel > 1)")
    return decode_pixels(ds, where)


def decode_pixels(ds: Dataset, where: str) -> npt.NDArray[Any]:
    """The instance's decoded pixel data (all frames); ``SeriesError`` saying why not."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise SeriesError(f"{where}: no pixel data")
    try:
        # Not ``ds.pixel_array``: that keeps the decoded array on the dataset as long as
        # the dataset lives (a second copy of the series beside the volume).
        array: npt.NDArray[Any] = pixel_array(ds)
    except Exception as exc:  # missing decoder, corrupt stream
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise SeriesError(f"{where}: cannot decode pixel data ({syntax}): {exc}") from exc
    return array


def _optional_uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value else None


def datasets_to_volume(datasets: Sequence[Dataset]) -> Volume:
    """Build the Volume from already-read datasets of one series."""
    if not datasets:
        raise SeriesError("no instances")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise SeriesError(f"instances from {len(series)} series: {sorted(series)}")
    frames: list[_Frame] = []
    for index, ds in enumerate(datasets):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            frames.extend(_multi_frame(ds, index))
        else:
            frames.append(_single_frame(ds, index))
    _check_consistent(frames)
    ordered, slice_spacing = _order(frames)

    decoded: dict[int, npt.NDArray[Any]] = {}
    frames_left = Counter(frame.source for frame in ordered)
    rows, columns = ordered[0].shape
    volume = np.empty((len(ordered), rows, columns), dtype=np.float32)
    for z, frame in enumerate(ordered):
        ds = datasets[frame.source]
        if frame.source not in decoded:
            decoded[frame.source] = _pixels(ds, f"instance {frame.sop_instance_uid}")
        frames_left[frame.source] -= 1
        # An instance's decoded pixels are kept only until its last frame is placed.
        pixels = (
            decoded.pop(frame.source) if frames_left[frame.source] == 0 else decoded[frame.source]
        )
        plane = pixels if frame.frame is None else pixels[frame.frame]
        if plane.shape != (rows, columns):
            raise SeriesError(
                f"instance {frame.sop_instance_uid}: pixel data of shape {plane.shape}, "
                f"header says {rows}x{columns}"
            )
        volume[z] = plane.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)

    first = datasets[ordered[0].source]
    sop_uids = tuple(frame.sop_instance_uid for frame in ordered)
    frame_numbers = (
        tuple(1 + (frame.frame or 0) for frame in ordered)
        if any(frame.frame is not None for frame in ordered)
        else ()
    )
    o = ordered[0].orientation
    p = ordered[0].position
    return Volume(
        array=volume,
        spacing=(slice_spacing, ordered[0].pixel_spacing[0], ordered[0].pixel_spacing[1]),
        orientation=(float(o[0]), float(o[1]), float(o[2]), float(o[3]), float(o[4]), float(o[5])),
        origin=(float(p[0]), float(p[1]), float(p[2])),
        modality=str(first.get("Modality", "OT") or "OT"),
        sop_instance_uids=sop_uids,
        source_frame_numbers=frame_numbers,
        series_instance_uid=_optional_uid(first, "SeriesInstanceUID"),
        study_instance_uid=_optional_uid(first, "StudyInstanceUID"),
        frame_of_reference_uid=_optional_uid(first, "FrameOfReferenceUID"),
    )


def load_series(sources: Iterable[str | Path | Dataset], keys: KeyRing | None = None) -> Volume:
    """Read the files (or take the datasets) of one series and build its Volume; ``keys``
    decrypt files the node encrypted (``dicom_node.security.crypto``)."""
    datasets: list[Dataset] = []
    for source in sources:
        if isinstance(source, Dataset):
            datasets.append(source)
            continue
        try:
            datasets.append(read_dicom(Path(source), keys))
        except Exception as exc:
            raise SeriesError(f"{source}: not a readable DICOM file: {exc}") from exc
    return datasets_to_volume(datasets)


def load_directory(directory: Path, pattern: str = "*") -> Volume:
    """All DICOM files directly in ``directory`` as one series."""
    paths = sorted(p for p in directory.glob(pattern) if p.is_file())
    if not paths:
        raise SeriesError(f"{directory}: no files")
    return load_series(paths)
