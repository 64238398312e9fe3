"""The backend round trip and the custom GPU paths, on every ``xp`` (CuPy marked gpu);
CuPy imported by the backend only."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import processors
from processors.api import run_processor
from processors.backend import resolve


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
