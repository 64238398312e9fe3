"""kmeans against scikit-learn (adjusted Rand index >= 0.99)."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from proc_testing import SPACING, to_numpy
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from processors.api import run_processor
from processors.base import LabelResult, Volume
from processors.cluster import build_features, kmeans_xp


def _labels(results: list) -> np.ndarray:
    return to_numpy(next(r for r in results if isinstance(r, LabelResult)).labels)


def _reference(phantom_values, k, spatial_weight=0.0, n_init=1):
    x = build_features(np, Volume(phantom_values, spacing=SPACING), spatial_weight)
    return KMeans(n_clusters=k, n_init=n_init, random_state=0).fit_predict(x)


@pytest.mark.parametrize("k", [3, 4])
def test_kmeans_matches_sklearn(phantom, device, k):
    out = _labels(run_processor("kmeans", phantom.values, SPACING, device, k=k))
    assert adjusted_rand_score(_reference(phantom.values, k), out.ravel()) >= 0.99
    # Labels are ordered by intensity: air (darkest) is class 1, bone (brightest) class k.
    assert np.median(out[phantom.values < -950]) == 1
    assert np.median(out[phantom.labels["bone"]]) == k


def test_kmeans_spatial_features_match_sklearn(phantom, device):
    # With position features the problem has poor local optima (one k-means++ start of
    # scikit-learn ends at inertia 6190, the best found is 6125): several starts on both
    # sides make the comparison about the algorithm, not the luck of one initialisation.
    out = _labels(
        run_processor("kmeans", phantom.values, SPACING, device, k=3, spatial_weight=0.5, n_init=8)
    )
    expected = _reference(phantom.values, 3, spatial_weight=0.5, n_init=8)
    assert adjusted_rand_score(expected, out.ravel()) >= 0.99


def test_array_kmeans_spatial_matches_sklearn_on_numpy(phantom):
    x = build_features(np, Volume(phantom.values, spacing=SPACING), 0.5)
    labels, _ = kmeans_xp(np, x, 3, max_iter=100, tol=1e-4, n_init=8, seed=0)
    expected = KMeans(n_clusters=3, n_init=8, random_state=0).fit_predict(x)
    assert adjusted_rand_score(expected, labels) >= 0.99


def test_array_kmeans_matches_sklearn_on_numpy(phantom):
    # The GPU algorithm, run with NumPy.
    x = build_features(np, Volume(phantom.values, spacing=SPACING), 0.0)
    labels, _ = kmeans_xp(np, x, 4, max_iter=100, tol=1e-4, n_init=1, seed=0)
    expected = KMeans(n_clusters=4, n_init=1, random_state=0).fit_predict(x)
    assert adjusted_rand_score(expected, labels) >= 0.99


def test_kmeans_on_subsample(phantom, device):
    out = _labels(run_processor("kmeans", phantom.values, SPACING, device, k=3, sample_size=5000))
    x = build_features(np, Volume(phantom.values, spacing=SPACING), 0.0)
    pick = np.sort(np.random.default_rng(0).choice(x.shape[0], size=5000, replace=False))
    expected = KMeans(n_clusters=3, n_init=1, random_state=0).fit(x[pick]).predict(x)
    assert adjusted_rand_score(expected, out.ravel()) >= 0.99


def test_kmeans_bad_k():
    with pytest.raises(pydantic.ValidationError, match="k"):
        run_processor("kmeans", np.zeros((2, 2, 2), np.float32), k=1)
