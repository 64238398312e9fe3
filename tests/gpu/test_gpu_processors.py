"""Every built-in on CUDA against the same processor on the CPU (and so its reference)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dicom_node.synthetic import make_phantom
from processors.api import run_processor
from processors.backend import resolve
from processors.base import ImageResult, LabelResult, MeasurementResult

pytestmark = pytest.mark.gpu

SPACING = (2.5, 2.0, 2.0)


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return make_phantom((20, 64, 64), SPACING, lesion_radius_mm=12.0, seed=4).values


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


CASES = [
    ("mean", {"size": 3}),
    ("median", {"size": 3}),
    ("gaussian", {"sigma_mm": 2.0}),
    ("nlm", {"patch_size": 5, "patch_distance": 2, "h": 12.0, "sigma": 12.0}),
    ("bilateral", {"sigma_spatial_mm": 2.0, "sigma_range": 40.0}),
    ("window", {"preset": "lung"}),
    ("histeq", {}),
    ("clahe", {}),
    ("threshold_segment", {"preset": "body", "keep_largest": 1, "fill_holes": True}),
    ("kmeans", {"k": 4}),
    ("features", {}),
    ("predict", {}),
]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_cpu(ct, name, params):
    cpu = run_processor(name, ct, SPACING, "cpu", **params)
    gpu = run_processor(name, ct, SPACING, "cuda:0", **params)
    assert [type(r) for r in cpu] == [type(r) for r in gpu]
    for a, b in zip(cpu, gpu, strict=True):
        if isinstance(a, ImageResult):
            assert isinstance(b.volume.array, np.ndarray)
            np.testing.assert_allclose(b.volume.array, a.volume.array, rtol=1e-3, atol=2e-2)
        elif isinstance(a, LabelResult):
            assert _dice(a.labels > 0, b.labels > 0) >= 0.99
        elif isinstance(a, MeasurementResult):
            for m, n in zip(a.measurements, b.measurements, strict=True):
                assert n.value == pytest.approx(m.value, rel=1e-3, abs=1e-3), m.concept.meaning
            for c, d in zip(a.classifications, b.classifications, strict=True):
                assert c.label == d.label
                assert d.probability == pytest.approx(c.probability, abs=1e-3)


def test_kernels_are_compiled_once():
    image = np.random.default_rng(0).normal(size=(16, 64, 64)).astype(np.float32)
    backend = resolve("cuda:0")
    assert backend.is_gpu and backend.xp.__name__ == "cupy"
    started = time.perf_counter()
    run_processor("bilateral", image, device="cuda:0")
    first = time.perf_counter() - started
    started = time.perf_counter()
    run_processor("bilateral", image, device="cuda:0")
    second = time.perf_counter() - started
    assert second < first
