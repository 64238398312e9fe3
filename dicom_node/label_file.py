"""A whole slide's label map on disk: written a region at a time, read a tile at a time.

The map is an ``np.memmap`` over an unnamed file (``tempfile.TemporaryFile``) in the run's
folder: it is an array like any other for whoever reads it whole (a test, a small image),
and its file goes with the last reference to it. ``release`` drops the pages a region
or a tile brought into this process (they stay in the file, or in the page cache), so
that the process holds no more of the map than the part it works on.
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def disk_label_map(
    shape: tuple[int, ...], dtype: npt.DTypeLike, folder: Path | None = None
) -> npt.NDArray[Any]:
    """A zeroed label map in an unnamed file in ``folder`` (the system's temporary folder
    when None)."""
    with tempfile.TemporaryFile(dir=folder) as file:
        return np.memmap(file, dtype=dtype, mode="w+", shape=shape)


def release(array: npt.NDArray[Any]) -> None:
    """Let go of the pages of the file mapping behind ``array`` (nothing for an array in
    memory); what was written stays in the file."""
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if isinstance(base, mmap.mmap):
        base.madvise(mmap.MADV_DONTNEED)
