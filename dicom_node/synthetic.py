"""Realistic synthetic CT and MR series with known anatomy, for the demo, tests and benchmarks.

The phantom is an elliptical body (soft tissue) with two lungs, a spine, and a spherical
lesion whose position and radius are known, so later stages can be checked against truth.
A CT series also has what a scanner sees around a patient: a curved table (two thin
carbon-fibre shells around a foam core) under a foam mattress, and a blanket on the front
of the body, a few millimetres off its sides, that hangs down to the table; none of it is body.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

HU_AIR = -1000.0
HU_LUNG = -850.0
HU_SOFT_TISSUE = 40.0
HU_LESION = 90.0
HU_BONE = 700.0
HU_FOAM = -930.0
HU_TABLE_SHELL = 300.0
HU_BLANKET = -300.0

#: Around the patient (mm): mattress under the body, table shell and core, blanket.
MATTRESS_MM = 6.0
TABLE_SHELL_MM = 2.5
TABLE_CORE_MM = 7.0
BLANKET_MM = 2.0
BLANKET_GAP_MM = 3.0

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@dataclass(frozen=True)
class Phantom:
    """Voxel grid truth, indexed [slice, row, column]."""

    values: npt.NDArray[np.float32]
    labels: dict[str, npt.NDArray[np.bool_]]
    lesion_center_voxel: tuple[float, float, float]
    lesion_radius_mm: float


@dataclass
class SyntheticSeries:
    datasets: list[Dataset]
    phantom: Phantom
    study_instance_uid: str
    series_instance_uid: str
    spacing: tuple[float, float, float]
    extra: dict[str, str] = field(default_factory=dict)

    def write(self, directory: Path, suffix: str = ".dcm") -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, dataset in enumerate(self.datasets):
            path = directory / f"{index + 1:04d}{suffix}"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


def make_phantom(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    lesion_radius_mm: float = 15.0,
    noise_sigma: float = 12.0,
    seed: int = 0,
    table: bool = False,
) -> Phantom:
    """The phantom in Hounsfield units on a ``shape`` grid with ``spacing`` (z, y, x) in mm.

    ``table`` adds the table, mattress and blanket (labels ``table`` and ``blanket``).
    """
    nz, ny, nx = shape
    sz, sy, sx = spacing
    z = (np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]

    half_width = 0.42 * nx * sx
    half_depth = 0.30 * ny * sy
    body = (xx / half_width) ** 2 + (yy / half_depth) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    lung_extent = max(nz * sz * 0.45, sz)
    lung_shape = ((yy + 0.1 * half_depth) / (0.6 * half_depth)) ** 2 + (zz / lung_extent) ** 2
    left_lung = ((xx + 0.45 * half_width) / (0.32 * half_width)) ** 2 + lung_shape <= 1.0
    right_lung = ((xx - 0.45 * half_width) / (0.32 * half_width)) ** 2 + lung_shape <= 1.0
    lungs = np.broadcast_to(left_lung | right_lung, shape) & body
    spine = np.broadcast_to(
        (xx**2 + (yy - 0.65 * half_depth) ** 2) <= (0.12 * half_depth) ** 2, shape
    )
    center_mm = (0.0, -0.2 * half_depth, 0.0)
    lesion = (zz - center_mm[0]) ** 2 + (yy - center_mm[1]) ** 2 + (
        xx - center_mm[2]
    ) ** 2 <= lesion_radius_mm**2

    values = np.full(shape, HU_AIR, dtype=np.float32)
    around: dict[str, npt.NDArray[np.bool_]] = {}
    if table:
        around = _table_and_blanket(xx, yy, half_width, half_depth, values, shape)
    values[body] = HU_SOFT_TISSUE
    values[lungs] = HU_LUNG
    values[spine] = HU_BONE
    values[lesion & body] = HU_LESION
    rng = np.random.default_rng(seed)
    values += rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)

    center_voxel = (
        center_mm[0] / sz + (nz - 1) / 2,
        center_mm[1] / sy + (ny - 1) / 2,
        center_mm[2] / sx + (nx - 1) / 2,
    )
    labels = {
        "body": np.asarray(body, dtype=bool),
        "lung": np.asarray(lungs, dtype=bool),
        "bone": np.asarray(spine, dtype=bool),
        "lesion": np.asarray(lesion & body, dtype=bool),
        **around,
    }
    return Phantom(values, labels, center_voxel, lesion_radius_mm)


def _table_and_blanket(
    xx: npt.NDArray[np.float32],
    yy: npt.NDArray[np.float32],
    half_width: float,
    half_depth: float,
    values: npt.NDArray[np.float32],
    shape: tuple[int, int, int],
) -> dict[str, npt.NDArray[np.bool_]]:
    """Paint the mattress, table and blanket into ``values`` (posterior is +y); their masks."""
    # The table top curves up at the sides (a cradle) below a mattress under the body.
    top = half_depth + MATTRESS_MM - 0.15 * xx**2 / half_width
    depth = yy - top
    wide = np.abs(xx) <= 1.3 * half_width
    shell = TABLE_SHELL_MM
    mattress = wide & (depth < 0) & (depth >= -MATTRESS_MM)
    core = wide & (depth >= shell) & (depth < shell + TABLE_CORE_MM)
    shells = wide & (depth >= 0) & (depth < 2 * shell + TABLE_CORE_MM) & ~core
    # A blanket resting on the front of the body and falling away from it towards the
    # sides (a few millimetres off the skin there), hanging down to the table.
    near, far = BLANKET_GAP_MM, BLANKET_GAP_MM + BLANKET_MM
    outer = (xx / (half_width + far)) ** 2 + (yy / (half_depth + BLANKET_MM)) ** 2 <= 1.0
    inner = (xx / (half_width + near)) ** 2 + (yy / half_depth) ** 2 <= 1.0
    draped = (np.abs(xx) >= half_width + near) & (np.abs(xx) < half_width + far)
    blanket = ((outer & ~inner & (yy <= 0)) | (draped & (yy > 0) & (depth < 0))) & ~shells
    masks = {
        "table": np.broadcast_to(shells, shape),
        "blanket": np.broadcast_to(blanket, shape),
    }
    values[np.broadcast_to(mattress | core, shape)] = HU_FOAM
    values[masks["table"]] = HU_TABLE_SHELL
    values[masks["blanket"]] = HU_BLANKET
    return {name: np.asarray(mask, dtype=bool) for name, mask in masks.items()}


def _uid(seed: str | None, *parts: object) -> str:
    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[seed, *map(str, parts)]))


def _base_dataset(
    sop_class_uid: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    patient_name: str,
    series_description: str,
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    now = dt.datetime(2026, 1, 15, 9, 30, 0)
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.AccessionNumber = "SYN0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = "Synthetic phantom study"
    ds.Modality = modality
    ds.Manufacturer = "dicom-node synthetic"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.FrameOfReferenceUID = _uid(study_uid, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _file_meta(dataset: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _slice_geometry(
    orientation: tuple[float, ...],
    index: int,
    slice_spacing: float,
    origin: npt.NDArray[np.float64],
) -> list[float]:
    row = np.array(orientation[:3])
    column = np.array(orientation[3:])
    normal = np.cross(row, column)
    position = origin + index * slice_spacing * normal
    return [round(float(v), 4) for v in position]


def generate_series(
    *,
    modality: str = "CT",
    num_slices: int = 40,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: float = 0.7,
    slice_thickness: float = 2.5,
    orientation: tuple[float, ...] = AXIAL,
    seed: int = 0,
    uid_seed: str | None = None,
    study_instance_uid: str | None = None,
    patient_id: str = "SYN-0001",
    patient_name: str = "Phantom^Synthetic",
    series_description: str | None = None,
    lesion_radius_mm: float = 15.0,
    table: bool = True,
) -> SyntheticSeries:
    """A CT (int16 with rescale, HU) or MR (uint16) series of the phantom.

    ``uid_seed`` makes the UIDs reproducible; otherwise each call gets new ones. ``table``
    puts the patient on a table under a blanket (CT only: neither gives MR signal).
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, not {modality!r}")
    spacing = (slice_thickness, pixel_spacing, pixel_spacing)
    phantom = make_phantom(
        (num_slices, rows, columns),
        spacing,
        lesion_radius_mm=lesion_radius_mm,
        seed=seed,
        table=table and modality == "CT",
    )
    study_uid = study_instance_uid or _uid(uid_seed, "study")
    series_uid = _uid(uid_seed, "series", modality, study_uid)
    description = series_description or f"Synthetic {modality} phantom"
    origin = np.array([-(columns - 1) / 2 * pixel_spacing, -(rows - 1) / 2 * pixel_spacing, 0.0])
    if orientation != AXIAL:
        origin = np.array([origin[0], 0.0, (rows - 1) / 2 * pixel_spacing])

    if modality == "CT":
        stored = np.clip(np.rint(phantom.values + 1024.0), -2048, 4095).astype(np.int16)
        sop_class = CTImageStorage
    else:
        mr_values = np.interp(
            phantom.values,
            [HU_AIR, HU_LUNG, HU_SOFT_TISSUE, HU_LESION, HU_BONE],
            [0.0, 60.0, 600.0, 900.0, 300.0],
        )
        stored = np.clip(np.rint(mr_values), 0, 4095).astype(np.uint16)
        sop_class = MRImageStorage

    datasets = []
    for index in range(num_slices):
        ds = _base_dataset(
            sop_class, modality, study_uid, series_uid, patient_id, patient_name, description
        )
        ds.SOPInstanceUID = _uid(uid_seed, "instance", series_uid, index)
        ds.InstanceNumber = index + 1
        axial = modality == "CT" and orientation == AXIAL
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if axial else "OTHER"]
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = _slice_geometry(orientation, index, slice_thickness, origin)
        ds.ImageOrientationPatient = list(orientation)
        ds.SliceThickness = slice_thickness
        ds.SpacingBetweenSlices = slice_thickness
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if modality == "CT" else 12
        ds.HighBit = ds.BitsStored - 1
        if modality == "CT":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            ds.KVP = 120
            ds.WindowCenter = 40
            ds.WindowWidth = 400
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = 15
            ds.RepetitionTime = 500
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
        ds.PixelData = stored[index].tobytes()
        ds.file_meta = _file_meta(ds)
        datasets.append(ds)
    return SyntheticSeries(datasets, phantom, study_uid, series_uid, spacing)
