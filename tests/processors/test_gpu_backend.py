"""The backend round trip and the custom GPU paths, on every ``xp`` (CuPy marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest

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
