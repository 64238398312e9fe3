"""Array backend: NumPy + scipy.ndimage on the CPU, CuPy + cupyx.scipy.ndimage on a GPU.

This is the only module that imports CuPy, and only when a GPU device is asked for (or
``auto`` probes for one). Processors receive the array module ``xp`` and get the matching
``ndimage`` from ``ndimage_for(xp)``; data moves between host and device only here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np

Array = Any

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


class BackendError(Exception):
    """The requested device cannot be used; the message says why."""


@dataclass(frozen=True)
class Backend:
    """The namespaces a processor runs with, and the device they live on."""

    xp: ModuleType
    ndimage: ModuleType
    device: str  # "cpu" or "cuda:N"

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"


def parse_device(device: str) -> tuple[str, int]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> (kind, index)."""
    match = _DEVICE_PATTERN.match(device.strip().lower())
    if match is None:
        raise BackendError(f"device must be auto, cpu or cuda:N, not {device!r}")
    kind = match.group(1).split(":")[0]
    return kind, int(match.group(2) or 0)


@cache
def cupy_status() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device, and if not, why."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return False, f"CuPy is not importable: {type(exc).__name__}: {exc}"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return False, f"CuPy sees no CUDA device: {type(exc).__name__}: {exc}"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"CuPy {cupy.__version__}, {count} CUDA device(s)"


def cpu_backend() -> Backend:
    import scipy.ndimage

    return Backend(np, scipy.ndimage, "cpu")


def resolve(device: str = "auto") -> Backend:
    """Pick the backend for ``device``: ``auto`` uses CUDA device 0 when CuPy has one."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return cpu_backend()
    ok, reason = cupy_status()
    if not ok:
        if kind == "auto":
            return cpu_backend()
        raise BackendError(f"device {device!r} is not usable: {reason}")
    cupy = importlib.import_module("cupy")
    ndimage = importlib.import_module("cupyx.scipy.ndimage")
    count = int(cupy.cuda.runtime.getDeviceCount())
    if index >= count:
        raise BackendError(f"device cuda:{index} does not exist ({count} CUDA device(s))")
    cupy.cuda.Device(index).use()
    return Backend(cupy, ndimage, f"cuda:{index}")


def is_cupy(xp: ModuleType) -> bool:
    return xp.__name__ == "cupy"


def ndimage_for(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    if is_cupy(xp):
        return importlib.import_module("cupyx.scipy.ndimage")
    return importlib.import_module("scipy.ndimage")


def array_module(array: Array) -> ModuleType:
    """The namespace an array belongs to (without importing CuPy for NumPy arrays)."""
    if isinstance(array, np.ndarray | np.generic):
        return np
    module = type(array).__module__.split(".")[0]
    if module == "cupy":
        return importlib.import_module("cupy")
    return np


def to_device(array: Array, backend: Backend) -> Array:
    """Move (or keep) ``array`` on the backend's device."""
    if backend.is_gpu:
        return backend.xp.asarray(array)
    return to_host(array)


def to_host(array: Array) -> Any:
    """A NumPy array (copying from the GPU when needed)."""
    if isinstance(array, np.ndarray):
        return array
    getter = getattr(array, "get", None)
    if getter is not None and type(array).__module__.split(".")[0] == "cupy":
        return getter()
    return np.asarray(array)


def to_float(value: Any) -> float:
    """A Python float from a NumPy or CuPy scalar / 0-d array."""
    return float(to_host(value)) if not isinstance(value, int | float) else float(value)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued GPU work (no-op on NumPy); for timing."""
    if is_cupy(xp):
        xp.cuda.get_current_stream().synchronize()


def compile_kernel(xp: ModuleType, source: str, name: str, options: tuple[str, ...] = ()) -> Any:
    """A cached ``cupy.RawKernel`` (CuPy also keeps compiled binaries in its disk cache)."""
    return _raw_kernel(source, name, options)


@cache
def _raw_kernel(source: str, name: str, options: tuple[str, ...]) -> Any:
    cupy = importlib.import_module("cupy")
    return cupy.RawKernel(source, name, options=options)
