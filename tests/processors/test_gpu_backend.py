"""The backend round trip and the custom GPU paths, on every ``xp`` (CuPy marked gpu);
CuPy imported by the backend only; a GPU device current only around the work on it."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

import processors
from processors import backend
from processors.api import run_on_backend, run_processor, volume_to
from processors.backend import resolve
from processors.base import Volume


def test_backend_resolves_to_xp_namespace(xp, device):
    chosen = resolve(device)
    assert chosen.xp is xp
    (result,) = run_processor("mean", np.ones((3, 4, 5), np.float32), device=device)
    # Results always come back on the host.
    assert isinstance(result.volume.array, np.ndarray)
    np.testing.assert_allclose(result.volume.array, 1.0)


@pytest.mark.parametrize("name", ["nlm", "bilateral", "clahe", "kmeans"])
def test_custom_gpu_paths_run(xp, device, name):
    image = np.random.default_rng(0).normal(size=(6, 20, 20)).astype(np.float32)
    results = run_processor(name, image, device=device)
    assert results


# --- CuPy has one home --------------------------------------------------------------------

PROCESSORS_DIR = Path(processors.__file__).parent
GPU_PACKAGES = ("cupy", "cupyx")
IMPORT_FUNCTIONS = ("import_module", "__import__")


def _is_gpu_module(name: str) -> bool:
    return name.split(".")[0] in GPU_PACKAGES


def gpu_imports(source: str) -> list[str]:
    """Every import of CuPy/cupyx in ``source``: statements, and importlib or __import__
    calls with a literal name."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_gpu_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _is_gpu_module(node.module):
            found.append(node.module)
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else None
            called = function.id if isinstance(function, ast.Name) else called
            first = node.args[0]
            if (
                called in IMPORT_FUNCTIONS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and _is_gpu_module(first.value)
            ):
                found.append(first.value)
    return found


def test_the_scan_finds_every_way_of_importing_cupy():
    source = (
        "import cupy\nimport cupyx.scipy.ndimage as ndi\nfrom cupy import RawKernel\n"
        "import importlib\nimportlib.import_module('cupy')\n__import__('cupyx')\n"
        "from importlib import import_module\nimport_module('cupy.cuda')\n"
        "import numpy\nimportlib.import_module('scipy.ndimage')\n"
    )
    assert gpu_imports(source) == [
        "cupy",
        "cupyx.scipy.ndimage",
        "cupy",
        "cupy",
        "cupyx",
        "cupy.cuda",
    ]


def test_only_the_backend_imports_cupy():
    offenders = {
        str(path.relative_to(PROCESSORS_DIR)): names
        for path in sorted(PROCESSORS_DIR.rglob("*.py"))
        if path != PROCESSORS_DIR / "backend.py"
        for names in [gpu_imports(path.read_text())]
        if names
    }
    assert offenders == {}, "import CuPy through processors.backend only"


# --- The device is current only around the work -------------------------------------------


class FakeCuda:
    """Records what a fake ``cupy.cuda`` is asked: ``Device(n).use()`` (a switch for the
    whole thread) or ``with Device(n):`` (current until the block ends)."""

    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.current: list[int] = [0]
        self.events: list[tuple[str, int]] = []
        self.runtime = SimpleNamespace(getDeviceCount=lambda: self.devices)
        cuda = self

        class Device:
            def __init__(self, index: int = 0) -> None:
                self.index = index

            def use(self) -> None:
                cuda.events.append(("use", self.index))
                cuda.current[-1] = self.index

            def __enter__(self) -> Device:
                cuda.events.append(("enter", self.index))
                cuda.current.append(self.index)
                return self

            def __exit__(self, *exc: object) -> None:
                cuda.events.append(("exit", cuda.current.pop()))

        self.Device = Device

    def record(self, what: str) -> None:
        self.events.append((what, self.current[-1]))


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCuda]:
    cuda = FakeCuda(devices=2)
    cupy = ModuleType("cupy")
    cupy.__version__ = "0+fake"
    cupy.cuda = cuda

    def asarray(array: object) -> np.ndarray:
        cuda.record("asarray")
        return np.asarray(array)

    cupy.asarray = asarray
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    for name in ("cupyx", "cupyx.scipy", "cupyx.scipy.ndimage"):
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    backend.cupy_status.cache_clear()
    backend.clear_kernels()
    yield cuda
    backend.cupy_status.cache_clear()
    backend.clear_kernels()


class RecordingProcessor:
    name = "recording"
    version = "1.0.0"
    family = "enhance"

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def run(self, volume: Volume, params: object, xp: ModuleType) -> list[object]:
        self.cuda.record("run")
        return []


def test_a_gpu_backend_switches_no_device_for_the_process(fake_cupy):
    chosen = resolve("cuda:1")
    assert chosen.is_gpu and chosen.device == "cuda:1"
    assert fake_cupy.events == []  # resolving picks, it does not switch
    volume = volume_to(Volume(np.zeros((2, 3, 4), np.float32)), chosen)
    run_on_backend(RecordingProcessor(fake_cupy), volume, None, chosen)
    assert fake_cupy.events == [
        ("enter", 1),
        ("asarray", 1),
        ("exit", 1),
        ("enter", 1),
        ("run", 1),
        ("exit", 1),
    ]
    assert fake_cupy.current == [0]  # the caller's device, as before


def test_the_cpu_backend_enters_no_device(fake_cupy):
    chosen = resolve("cpu")
    with chosen.on_device():
        pass
    run_on_backend(RecordingProcessor(fake_cupy), Volume(np.zeros((2, 2, 2))), None, chosen)
    assert fake_cupy.events == [("run", 0)]


def test_kernels_are_made_once_in_the_backend(fake_cupy, monkeypatch):
    made: list[str] = []

    def kernel(name_at: int) -> Callable[..., str]:
        def make(*spec: str) -> str:
            made.append(spec[name_at])
            return spec[name_at]

        return make

    cupy = sys.modules["cupy"]
    monkeypatch.setattr(cupy, "RawKernel", kernel(1), raising=False)
    monkeypatch.setattr(cupy, "ElementwiseKernel", kernel(3), raising=False)
    for _ in range(2):
        assert backend.raw_kernel("__global__ void k() {}", "k") == "k"
        assert backend.elementwise_kernel("float64 x", "float64 y", "y = x", "e") == "e"
    assert backend.raw_kernel("__global__ void k() {}", "k", ("-O3",)) == "k"
    assert made == ["k", "e", "k"]
