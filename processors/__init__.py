"""The processor SDK and the built-in processors.

``run_processor(name, array, spacing=(z, y, x), device="cpu", **params)`` runs one processor
from a script or notebook. Importing this package imports no GPU library.
"""

from __future__ import annotations

from processors.api import run_pipeline, run_processor
from processors.base import (
    Classification,
    Code,
    ImageResult,
    LabelResult,
    Measurement,
    MeasurementResult,
    Processor,
    ProcessorError,
    ProcessorParams,
    Result,
    SegmentDescription,
    Volume,
)

__all__ = [
    "Classification",
    "Code",
    "ImageResult",
    "LabelResult",
    "Measurement",
    "MeasurementResult",
    "Processor",
    "ProcessorError",
    "ProcessorParams",
    "Result",
    "SegmentDescription",
    "Volume",
    "run_pipeline",
    "run_processor",
]
