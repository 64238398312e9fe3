"""The processor contract: ``Volume`` in, ``Result`` objects out, no I/O.

A processor is a class with ``name``, ``version``, ``family``, a frozen pydantic ``Params``
model (defaults and bounds), and ``run(volume, params, xp) -> list[Result]``. ``xp`` is the
array namespace (``numpy`` or ``cupy``); ``processors.backend.ndimage_for(xp)`` gives the
matching ``ndimage``. Arrays inside a ``Volume`` handed to ``run`` already live on the
device of ``xp``: host/device copies happen only at the pipeline edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import ModuleType
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from processors.errors import OperationFailedError

#: A NumPy or CuPy array. CuPy has no type stubs, so arrays are typed loosely.
Array = Any

FAMILIES = ("denoise", "enhance", "segment", "cluster", "features", "predict", "model")

AXIAL_ORIENTATION: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class ProcessorError(OperationFailedError):
    """A processor cannot run on this input; the message says why."""


class ProcessorParams(BaseModel):
    """Base of every processor's ``Params``: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class VoiLut:
    """A VOI lookup table from the header: the input value of its first entry, its
    entries, and their bits; values below or above the table take its ends."""

    first: int
    entries: tuple[int, ...]
    bits: int

    def apply(self, image: Array, xp: ModuleType) -> Array:
        """``image`` through the table, scaled to [0, 1] (as pydicom's ``apply_voi_lut``)."""
        table = xp.asarray(self.entries, dtype=xp.float32) / xp.float32(2**self.bits - 1)
        index = xp.clip(xp.rint(image).astype(xp.int64) - self.first, 0, len(self.entries) - 1)
        return table[index]


@dataclass(frozen=True)
class Volume:
    """A 3-D image in physical units, indexed ``[slice, row, column]``.

    ``spacing`` is (slice, row, column) in mm; ``orientation`` the DICOM
    ImageOrientationPatient (row direction cosines, then column direction cosines);
    ``origin`` the patient position of voxel (0, 0, 0) in mm; ``sop_instance_uids`` the
    source instances in slice order (empty for arrays that did not come from DICOM), and
    ``source_frame_numbers`` the 1-based frame of each slice when the source is multi-frame
    (then the same instance UID repeats).

    ``planar``: the slices are independent 2-D images (a radiograph, a photo, the frames
    of a cine loop), not a volume: no geometry joins them, filters act within each frame,
    and ``spacing[0]`` means nothing. A colour image is a 4-D array ``[frame, row, column,
    channel]`` in RGB (``colour``). ``spacing_known`` is false when the header gave no
    pixel spacing (then ``spacing`` is 1 pixel and areas are in pixels), and
    ``spacing_note`` says what the spacing is, e.g. "at the detector" for a radiograph's
    ImagerPixelSpacing. ``window`` is the header's first VOI window (centre, width), for
    display-like processors, and ``voi_lut`` the header's VOI LUT when it has one instead.
    """

    array: Array
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: tuple[float, float, float, float, float, float] = AXIAL_ORIENTATION
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    modality: str = "OT"
    sop_instance_uids: tuple[str, ...] = ()
    source_frame_numbers: tuple[int, ...] = ()
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    planar: bool = False
    spacing_known: bool = True
    spacing_note: str = ""
    window: tuple[float, float] | None = None
    voi_lut: VoiLut | None = None

    def __post_init__(self) -> None:
        shape = getattr(self.array, "shape", None)
        colour = shape is not None and len(shape) == 4 and shape[3] == 3 and self.planar
        if shape is None or (len(shape) != 3 and not colour):
            raise ProcessorError(
                f"a Volume holds a 3-D array (or, planar, a 4-D RGB one), not one of shape {shape}"
            )
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ProcessorError(f"spacing must be three positive numbers, not {self.spacing}")
        if len(self.orientation) != 6 or len(self.origin) != 3:
            raise ProcessorError("orientation has 6 numbers and origin 3")
        if self.sop_instance_uids and len(self.sop_instance_uids) != shape[0]:
            raise ProcessorError(f"{len(self.sop_instance_uids)} source UIDs for {shape[0]} slices")
        if self.source_frame_numbers and len(self.source_frame_numbers) != shape[0]:
            raise ProcessorError(
                f"{len(self.source_frame_numbers)} frame numbers for {shape[0]} slices"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape[:3]
        return (int(z), int(y), int(x))

    @property
    def colour(self) -> bool:
        return len(self.array.shape) == 4

    @property
    def pixel_area_mm2(self) -> float:
        return self.spacing[1] * self.spacing[2]

    def region_size(self) -> tuple[Code, Code, float]:
        """How a region's size is told on this image: (concept, unit, size of one voxel):
        a volume in mm3, a 2-D region's area in mm2, or in pixels when the image has no
        pixel spacing."""
        if not self.planar:
            return Codes.VOLUME, Units.MM3, self.voxel_volume_mm3
        if self.spacing_known:
            return Codes.AREA, Units.MM2, self.pixel_area_mm2
        return Codes.AREA, Units.PIXELS, 1.0

    def in_plane(self, values: tuple[float, ...], none: float = 0.0) -> tuple[float, ...]:
        """Per-axis sizes (slice, row, column) with the slice axis set to ``none`` when the
        slices are independent images, so that a 3-D filter acts within each frame."""
        return (none, *values[1:]) if self.planar else values

    @property
    def voxel_volume_mm3(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2]

    def with_array(self, array: Array) -> Volume:
        """The same geometry and provenance around another array of the same shape."""
        if tuple(array.shape) != tuple(self.array.shape):
            raise ProcessorError(f"shape {array.shape} differs from {self.array.shape}")
        return replace(self, array=array)


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning), as DICOM codes are written."""

    value: str
    scheme: str
    meaning: str


# Codes used by the built-ins (values checked against pydicom.sr.codedict). SNOMED CT (SCT)
# where one fits, DCM otherwise, and the private scheme "99DCMNODE" for the rest; UCUM units.
class Codes:
    TISSUE = Code("85756007", "SCT", "Tissue")
    ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code(
        "49755003", "SCT", "Morphologically Abnormal Structure"
    )
    PHYSICAL_OBJECT = Code("260787004", "SCT", "Physical object")
    ENTIRE_BODY = Code("38266002", "SCT", "Entire body")
    BONE = Code("272673000", "SCT", "Bone")
    LUNG = Code("39607008", "SCT", "Lung")
    AIR = Code("15158005", "SCT", "Air")
    SOFT_TISSUE = Code("87784001", "SCT", "Soft tissue")
    LESION = Code("52988006", "SCT", "Lesion")
    MEAN = Code("373098007", "SCT", "Mean")
    STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")
    MINIMUM = Code("255605001", "SCT", "Minimum")
    MAXIMUM = Code("56851009", "SCT", "Maximum")
    MEDIAN = Code("373099004", "SCT", "Median")
    VOLUME = Code("118565006", "SCT", "Volume")
    AREA = Code("42798000", "SCT", "Area")
    FINDING = Code("404684003", "SCT", "Finding")
    PRESENT = Code("52101004", "SCT", "Present")
    ABSENT = Code("272519000", "SCT", "Absent")
    SKEWNESS = Code("126051", "DCM", "Skewness")
    KURTOSIS = Code("126052", "DCM", "Kurtosis")

    @staticmethod
    def local(value: str, meaning: str) -> Code:
        """A concept with no standard code, in this node's private coding scheme."""
        return Code(value, "99DCMNODE", meaning)


class Units:
    HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
    MM3 = Code("mm3", "UCUM", "cubic millimeter")
    MM2 = Code("mm2", "UCUM", "square millimeter")
    PIXELS = Code("{pixels}", "UCUM", "pixels")
    ML = Code("ml", "UCUM", "milliliter")
    MM = Code("mm", "UCUM", "millimeter")
    NO_UNITS = Code("1", "UCUM", "no units")
    COUNT = Code("{count}", "UCUM", "count")


class AlgorithmType(StrEnum):
    AUTOMATIC = "AUTOMATIC"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    MANUAL = "MANUAL"


@dataclass(frozen=True)
class SegmentDescription:
    """One segment of a label map: its label value, name, and coded category and type."""

    label: int
    name: str
    category: Code
    type: Code
    algorithm_type: AlgorithmType = AlgorithmType.AUTOMATIC

    def __post_init__(self) -> None:
        if self.label < 1:
            raise ProcessorError(f"segment labels start at 1, not {self.label}")
        if not self.name:
            raise ProcessorError("a segment needs a name")


@dataclass(frozen=True)
class ImageResult:
    """New pixel data on the input's geometry (becomes a derived series)."""

    volume: Volume
    description: str
    processor: str = ""
    processor_version: str = ""


@dataclass(frozen=True)
class LabelResult:
    """An integer label map (0 = background) and its segments (becomes a DICOM SEG)."""

    labels: Array
    segments: tuple[SegmentDescription, ...]
    geometry: Volume
    description: str = ""
    processor: str = ""
    processor_version: str = ""

    def __post_init__(self) -> None:
        if tuple(self.labels.shape) != self.geometry.shape:
            raise ProcessorError(
                f"label map shape {self.labels.shape} differs from the volume's "
                f"{self.geometry.shape}"
            )
        values = [s.label for s in self.segments]
        if len(set(values)) != len(values):
            raise ProcessorError(f"segment labels repeat: {values}")

    def mask(self, label: int) -> Array:
        return self.labels == label


@dataclass(frozen=True)
class Measurement:
    """A number with a coded concept and a UCUM unit, optionally for one segment."""

    concept: Code
    value: float
    unit: Code
    segment: int | None = None
    derivation: str = ""


@dataclass(frozen=True)
class Classification:
    """A coded finding with a label and its probability (0..1)."""

    concept: Code
    label: str
    probability: float
    value: Code | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ProcessorError(f"a probability is within 0..1, not {self.probability}")


@dataclass(frozen=True)
class MeasurementResult:
    """Numbers, classifications and per-segment statistics (becomes SR TID 1500)."""

    measurements: tuple[Measurement, ...] = ()
    classifications: tuple[Classification, ...] = ()
    description: str = ""
    processor: str = ""
    processor_version: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def value(self, meaning: str, segment: int | None = None) -> float:
        for item in self.measurements:
            if item.concept.meaning == meaning and item.segment == segment:
                return item.value
        raise KeyError(meaning)


Result = ImageResult | LabelResult | MeasurementResult


@dataclass(frozen=True)
class Accepts:
    """The images a processor takes, declared as ``accepts`` on its class.

    ``volumes``: 3-D greyscale volumes; ``planar``: 2-D images and stacks of them (one
    image, a cine loop), processed frame by frame; ``colour``: RGB images as they are
    (4-D arrays). A processor that does not take colour is given the luminance of a colour
    image (``luminance``). ``slides``: whole-slide images, run region by region
    (``dicom_node.slide_process`` knows how each such processor is tiled). A plugin that
    declares nothing takes volumes only.
    """

    volumes: bool = True
    planar: bool = False
    colour: bool = False
    slides: bool = False

    def describe(self) -> str:
        kinds = [
            name
            for name, ok in (("3-D", self.volumes), ("2-D", self.planar), ("slide", self.slides))
            if ok
        ]
        tone = "grey+colour" if self.colour else "grey"
        return f"{'/'.join(kinds) or 'nothing'}:{tone}"

    def as_dict(self) -> dict[str, bool]:
        return {
            "volumes": self.volumes,
            "planar": self.planar,
            "colour": self.colour,
            "slides": self.slides,
        }

    def refusal(self, name: str, volume: Volume) -> str | None:
        """Why processor ``name`` cannot take ``volume``, or ``None`` when it can."""
        if volume.planar and not self.planar:
            return f"{name} takes 3-D volumes only, and this is a 2-D image ({self.describe()})"
        if not volume.planar and not self.volumes:
            return f"{name} takes 2-D images only, and this is a 3-D volume ({self.describe()})"
        return None


VOLUMES_ONLY = Accepts()
EVERY_GREY_IMAGE = Accepts(volumes=True, planar=True, slides=True)
EVERY_IMAGE = Accepts(volumes=True, planar=True, colour=True, slides=True)
#: A global mapping over the image (histogram equalisation): no tiled form for a slide.
GREY_IMAGES_NOT_SLIDES = Accepts(volumes=True, planar=True)

#: ITU-R BT.709 luma weights, as ``skimage.color.rgb2gray``.
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)


def accepts_of(processor: object) -> Accepts:
    declared = getattr(processor, "accepts", None)
    return declared if isinstance(declared, Accepts) else VOLUMES_ONLY


def luminance(volume: Volume, xp: ModuleType) -> Volume:
    """A colour image's luminance (``skimage.color.rgb2gray``'s weights), a grey one as is."""
    if not volume.colour:
        return volume
    weights = xp.asarray(LUMA_WEIGHTS, dtype=xp.float32)
    grey = volume.array.astype(xp.float32) @ weights
    return replace(volume, array=grey)


@runtime_checkable
class Processor(Protocol):
    """What a plugin provides. ``run`` gets arrays and geometry and returns results."""

    name: ClassVar[str]
    version: ClassVar[str]
    family: ClassVar[str]
    Params: ClassVar[type[ProcessorParams]]

    def run(self, volume: Volume, params: Any, xp: ModuleType) -> list[Result]: ...


def check_processor_class(obj: object) -> str | None:
    """Why ``obj`` is not a usable processor class, or ``None`` when it is."""
    if not isinstance(obj, type):
        return f"entry point gives {type(obj).__name__}, not a class"
    for attribute in ("name", "version", "family"):
        value = getattr(obj, attribute, None)
        if not isinstance(value, str) or not value:
            return f"{obj.__name__}.{attribute} must be a non-empty string"
    family = getattr(obj, "family", "")
    if family not in FAMILIES:
        return f"{obj.__name__}.family {family!r} is not one of {', '.join(FAMILIES)}"
    params = getattr(obj, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return f"{obj.__name__}.Params must be a pydantic model class"
    if not params.model_config.get("frozen", False):
        return f"{obj.__name__}.Params must be frozen"
    if not callable(getattr(obj, "run", None)):
        return f"{obj.__name__} has no run method"
    return None


def stamp(results: Sequence[Result], name: str, version: str) -> list[Result]:
    """Fill in the producing processor's name and version where it is missing."""
    stamped: list[Result] = []
    for result in results:
        if not result.processor:
            result = replace(result, processor=name, processor_version=version)
        stamped.append(result)
    return stamped
