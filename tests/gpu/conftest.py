"""GPU-only tests: collected only where CuPy imports and sees a CUDA device, so a CPU CI
run never lists them (they carry the ``gpu`` marker for ``pytest -m gpu``)."""

from __future__ import annotations

from processors.backend import cupy_status

collect_ignore_glob = [] if cupy_status()[0] else ["test_*.py"]
