"""Helpers shared by the processor tests (imported as a plain module)."""

from __future__ import annotations

from typing import Any

import numpy as np

SPACING = (2.5, 2.0, 2.0)


def to_numpy(array: Any) -> np.ndarray:
    get = getattr(array, "get", None)
    return np.asarray(get() if get is not None and not isinstance(array, np.ndarray) else array)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(bool)
    b = b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)
