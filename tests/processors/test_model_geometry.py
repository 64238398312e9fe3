"""Orientation and resampling between a volume's grid and a model's."""

import numpy as np
from proc_testing import dice

from processors.model_geometry import resample_linear, target_shape


def test_resampling_round_trip_keeps_geometry():
    shape, spacing, model_spacing = (30, 90, 110), (3.0, 0.8, 0.8), (2.5, 2.0, 2.0)
    grid = target_shape(shape, spacing, model_spacing)
    assert grid == (36, 36, 44)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    centre = (14.3, 40.2, 61.7)
    radius_mm = 18.0
    sphere = (
        ((zz - centre[0]) * spacing[0]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[2]) ** 2
    ) <= radius_mm**2
    down = resample_linear(np, sphere.astype(np.float32), grid)
    back = resample_linear(np, down, shape) > 0.5
    assert back.shape == shape
    assert dice(back, sphere) > 0.95
    moved = np.array(np.nonzero(back)).mean(axis=1) - np.array(np.nonzero(sphere)).mean(axis=1)
    assert np.all(np.abs(moved * np.array(spacing)) < 0.5)  # centroid within 0.5 mm
    # A linear ramp survives both ways exactly (linear interpolation, shared grid edges).
    ramp = (xx * 0.3 + zz).astype(np.float32)
    coarse = resample_linear(np, ramp[:, :, 5:-5], (30, 90, 50))
    np.testing.assert_allclose(coarse.mean(), ramp[:, :, 5:-5].mean(), rtol=1e-4)
