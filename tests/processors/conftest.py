"""Fixtures for the processor tests: an ``xp`` namespace (NumPy, plus CuPy where it imports
and sees a GPU: those parameters carry the ``gpu`` marker), phantoms with known truth."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from proc_testing import SPACING

from dicom_node.synthetic import Phantom, make_phantom
from processors.backend import cupy_status


def _xp_params() -> list[Any]:
    params: list[Any] = [pytest.param("numpy", id="numpy")]
    if importlib.util.find_spec("cupy") is not None and cupy_status()[0]:
        params.append(pytest.param("cupy", id="cupy", marks=pytest.mark.gpu))
    return params


XP_PARAMS = _xp_params()


@pytest.fixture(params=XP_PARAMS)
def xp(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


@pytest.fixture
def device(xp: ModuleType) -> str:
    return "cuda:0" if xp.__name__ == "cupy" else "cpu"


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    """A small noisy CT phantom (HU) with body, lungs, spine and a 12 mm lesion."""
    return make_phantom((24, 64, 64), SPACING, lesion_radius_mm=12.0, noise_sigma=12.0, seed=3)


@pytest.fixture(scope="session")
def noisy_sphere() -> tuple[np.ndarray, np.ndarray]:
    """A bright sphere in a dark background under heavy noise, and its true mask."""
    shape = (32, 48, 48)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    truth = (zz - 15.5) ** 2 + (yy - 23.5) ** 2 + (xx - 23.5) ** 2 <= 11.0**2
    rng = np.random.default_rng(7)
    image = np.where(truth, 100.0, 0.0).astype(np.float32)
    image += rng.normal(0.0, 40.0, size=shape).astype(np.float32)
    return image, truth
