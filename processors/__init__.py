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
    if name not in __all__:
        raise AttributeError(f"module 'processors' has no attribute {name!r}")
    home = "processors.api" if name.startswith("run_") else "processors.base"
    return getattr(importlib.import_module(home), name)
