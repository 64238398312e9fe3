"""The processor SDK and the built-in processors.

``run_processor(name, array, spacing=(z, y, x), device="cpu", **params)`` runs one processor
from a script or notebook. Importing this package imports no GPU library, and nothing
heavier than itself until a name below is used: the command line imports
``processors.errors`` on every call and should not pay for NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    "run_pipeline": "processors.api",
    "run_processor": "processors.api",
    **{
        name: "processors.base"
        for name in (
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
        )
    },
}

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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'processors' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
