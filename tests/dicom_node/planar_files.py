"""2-D DICOM files for the image and output tests: the committed real DX, and generated
files with known truth: an ultrasound image with calibrated regions (known deltas) and a
digital mammogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.encode.common import uncompressed_file_meta

#: A real DX For Presentation (MONOCHROME1, 8 bits, with a window): highdicom's test file
#: (tests/data/README.md).
DX = Path(__file__).parents[1] / "data/highdicom/dx_image.dcm"

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def disc(
    shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> npt.NDArray[np.bool_]:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return np.asarray((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2)


def region(
    delta_x_cm: float, delta_y_cm: float, box: tuple[int, int, int, int], spatial_format: int = 1
) -> Dataset:
    """One item of SequenceOfUltrasoundRegions: a 2-D tissue region in cm over ``box``
    (x0, y0, x1, y1)."""
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionDataType = 1
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = box[0], box[1]
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = box[2], box[3]
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX, item.PhysicalDeltaY = delta_x_cm, delta_y_cm
    return item


def _patient_study_series(ds: Dataset, modality: str, name: str) -> None:
    ds.PatientName = "Phantom^Planar"
    ds.PatientID = "PLANAR-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[name, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, "instance"])
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261201"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "dicom-node tests"
    ds.PatientOrientation = ""


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta = uncompressed_file_meta(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ultrasound(
    path: Path, pixels: npt.NDArray[np.uint8], regions: list[Dataset], name: str = "us"
) -> Path:
    """An 8-bit MONOCHROME2 Ultrasound Image with ``regions`` as its calibration."""
    ds = Dataset()
    ds.SOPClassUID = US_IMAGE
    _patient_study_series(ds, "US", name)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SequenceOfUltrasoundRegions = regions
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return _save(ds, path)


def mammogram(path: Path, pixels: npt.NDArray[np.uint16], name: str = "mg") -> Path:
    """A 12-bit MONOCHROME2 Digital Mammography X-Ray Image, For Presentation (left CC)."""
    ds = Dataset()
    ds.SOPClassUID = MG_FOR_PRESENTATION
    _patient_study_series(ds, "MG", name)
    ds.PatientOrientation = ["A", "R"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.ImageLaterality = "L"
    ds.BodyPartExamined = "BREAST"
    ds.AnatomicRegionSequence = [_code("76752008", "SCT", "Breast")]
    ds.ViewCodeSequence = [_code("399162004", "SCT", "cranio-caudal")]
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.DistanceSourceToDetector = 660
    ds.DistanceSourceToPatient = 640
    ds.EstimatedRadiographicMagnificationFactor = 1.03125  # 660 / 640
    ds.AcquisitionContextSequence = []
    ds.BurnedInAnnotation = "NO"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.OrganExposed = "BREAST"
    ds.ContentTime = "120000"
    ds.AcquisitionDate, ds.AcquisitionTime = "20261201", "120000"
    ds.KVP = 28
    ds.ExposureTime = 1000
    ds.XRayTubeCurrent = 100
    ds.Exposure = 100
    ds.FocalSpots = 0.3
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    ds.BodyPartThickness = 45
    ds.CompressionForce = 100
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.LossyImageCompression = "00"
    ds.QualityControlImage = "NO"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return _save(ds, path)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
