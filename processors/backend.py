"""Array backend: NumPy + scipy.ndimage on the CPU, CuPy + cupyx.scipy.ndimage on a GPU.

This is the only module that imports CuPy (``namespaces`` does, and only when a GPU device
is asked for or ``auto`` probes for one; a test scans ``processors/`` for any other), and
the only one that keeps compiled CuPy kernels (``raw_kernel``, ``elementwise_kernel``).
Processors receive the array module ``xp`` and get the matching ``ndimage`` from
``ndimage_for(xp)``; data moves between host and device only here. A GPU backend's
device is current only inside ``Backend.on_device()``, never switched for the process.
"""

from __future__ import annotations

import contextlib
import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType
from typing import Any, Literal

import numpy as np

from processors.devices import BackendError as BackendError
from processors.devices import parse_device as parse_device

Array = Any


@dataclass(frozen=True)
class Backend:
    """The namespaces a processor runs with, and the device they live on."""

    xp: ModuleType
    ndimage: ModuleType
    device: str  # "cpu" or "cuda:N"

    @property
    def is_gpu(self) -> bool:
        return self.device != "cpu"

    def on_device(self) -> AbstractContextManager[Any]:
        """Where work on this backend runs: ``with cupy.cuda.Device(N)`` on a GPU (the
        caller's device is current again after it), nothing on the CPU."""
        if not self.is_gpu:
            return contextlib.nullcontext()
        return self.xp.cuda.Device(parse_device(self.device)[1])  # type: ignore[no-any-return]


def namespaces(gpu: bool) -> tuple[ModuleType, ModuleType]:
    """The array module and its ``ndimage``: NumPy and SciPy's, or CuPy and cupyx's.

    The one function that picks the namespace, and the one place CuPy is imported."""
    if gpu:
        return importlib.import_module("cupy"), importlib.import_module("cupyx.scipy.ndimage")
    return np, importlib.import_module("scipy.ndimage")


@cache
def cupy_status() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device, and if not, why."""
    try:
        cupy, _ = namespaces(gpu=True)
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
    return Backend(*namespaces(gpu=False), "cpu")


def resolve(device: str = "auto") -> Backend:
    """Pick the backend for ``device``: ``auto`` uses CUDA device 0 when CuPy has one.

    Nothing is switched here: the device is current only inside ``on_device()``."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return cpu_backend()
    ok, reason = cupy_status()
    if not ok:
        if kind == "auto":
            return cpu_backend()
        raise BackendError(f"device {device!r} is not usable: {reason}")
    cupy, ndimage = namespaces(gpu=True)
    count = int(cupy.cuda.runtime.getDeviceCount())
    if index >= count:
        raise BackendError(f"device cuda:{index} does not exist ({count} CUDA device(s))")
    return Backend(cupy, ndimage, f"cuda:{index}")


def is_cupy(xp: ModuleType) -> bool:
    return xp.__name__ == "cupy"


def ndimage_for(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    return namespaces(is_cupy(xp))[1]


def array_module(array: Array) -> ModuleType:
    """The namespace an array belongs to (without importing CuPy for NumPy arrays)."""
    if isinstance(array, np.ndarray | np.generic):
        return np
    module = type(array).__module__.split(".")[0]
    return namespaces(gpu=module == "cupy")[0]


def to_device(array: Array, backend: Backend) -> Array:
    """Move (or keep) ``array`` on the backend's device."""
    if backend.is_gpu:
        with backend.on_device():
            return backend.xp.asarray(array)
    return to_host(array)


def to_host(array: Array) -> Any:
    """A NumPy array (copying from the GPU when needed; CuPy copies from the array's own
    device, whichever is current)."""
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


KernelKind = Literal["RawKernel", "ElementwiseKernel"]


def raw_kernel(source: str, name: str, options: tuple[str, ...] = ()) -> Any:
    """A ``cupy.RawKernel`` for ``name`` in CUDA ``source``, made once per process."""
    return _kernel("RawKernel", source, name, options)


def elementwise_kernel(in_params: str, out_params: str, body: str, name: str) -> Any:
    """A ``cupy.ElementwiseKernel``, made once per process."""
    return _kernel("ElementwiseKernel", in_params, out_params, body, name)


@lru_cache(maxsize=64)
def _kernel(kind: KernelKind, *spec: str | tuple[str, ...]) -> Any:
    """The one cache of CuPy kernel objects (each compiles lazily per device and dtypes,
    and CuPy keeps the binaries in its disk cache too)."""
    cupy, _ = namespaces(gpu=True)
    return getattr(cupy, kind)(*spec)


def clear_kernels() -> None:
    """Forget every kernel (for tests)."""
    _kernel.cache_clear()


#: Slices per slab where work goes slice by slice (``slabs``): 16 slices of 512 x 512 hold
#: 4 MB of a boolean mask, 16 MB of float32, 32 MB of float64.
SLAB_SLICES = 16


def slabs(depth: int, size: int | None = None) -> list[slice]:
    """Runs of ``size`` slices (``SLAB_SLICES``) covering ``depth``: what works slice by
    slice runs on one slab at a time, so its temporaries are a slab's, not a volume's."""
    size = size or SLAB_SLICES
    return [slice(start, min(start + size, depth)) for start in range(0, depth, size)]
