"""kmeans against scikit-learn (adjusted Rand index >= 0.99), and its tissue classes inside
the body on real CTs and MRs."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from proc_testing import SPACING, to_numpy
from real_images import REAL_MRS, real_volume, reference_body
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from processors.api import run_processor
from processors.base import Codes, LabelResult, MeasurementResult, ProcessorError, Volume
from processors.cluster import (
    CT_TISSUES,
    FAT,
    KMeansParams,
    build_features,
    kmeans_xp,
    sample_index,
)
from processors.segment import body_mask

WHOLE = {"inside_body": False}


def _labels(results: list) -> np.ndarray:
    return to_numpy(next(r for r in results if isinstance(r, LabelResult)).labels)


def _label_result(results: list) -> LabelResult:
    return next(r for r in results if isinstance(r, LabelResult))


def _reference(phantom_values, k, spatial_weight=0.0, n_init=1):
    x, _, _ = build_features(np, Volume(phantom_values, spacing=SPACING), spatial_weight)
    return KMeans(n_clusters=k, n_init=n_init, random_state=0).fit_predict(x)


@pytest.mark.parametrize("k", [3, 4])
def test_kmeans_matches_sklearn(phantom, device, k):
    out = _labels(run_processor("kmeans", phantom.values, SPACING, device, k=k, **WHOLE))
    assert adjusted_rand_score(_reference(phantom.values, k), out.ravel()) >= 0.99
    # Labels are ordered by intensity: air (darkest) is class 1, bone (brightest) class k.
    assert np.median(out[phantom.values < -950]) == 1
    assert np.median(out[phantom.labels["bone"]]) == k


def test_kmeans_spatial_features_match_sklearn(phantom, device):
    # With position features the problem has poor local optima (one k-means++ start of
    # scikit-learn ends at inertia 6190, the best found is 6125): several starts on both
    # sides make the comparison about the algorithm, not the luck of one initialisation.
    out = _labels(
        run_processor(
            "kmeans", phantom.values, SPACING, device, k=3, spatial_weight=0.5, n_init=8, **WHOLE
        )
    )
    expected = _reference(phantom.values, 3, spatial_weight=0.5, n_init=8)
    assert adjusted_rand_score(expected, out.ravel()) >= 0.99


def test_array_kmeans_spatial_matches_sklearn_on_numpy(phantom):
    x, _, _ = build_features(np, Volume(phantom.values, spacing=SPACING), 0.5)
    labels, _ = kmeans_xp(np, x, 3, max_iter=100, tol=1e-4, n_init=8, seed=0)
    expected = KMeans(n_clusters=3, n_init=8, random_state=0).fit_predict(x)
    assert adjusted_rand_score(expected, labels) >= 0.99


def test_array_kmeans_matches_sklearn_on_numpy(phantom):
    # The GPU algorithm, run with NumPy.
    x, _, _ = build_features(np, Volume(phantom.values, spacing=SPACING), 0.0)
    labels, _ = kmeans_xp(np, x, 4, max_iter=100, tol=1e-4, n_init=1, seed=0)
    expected = KMeans(n_clusters=4, n_init=1, random_state=0).fit_predict(x)
    assert adjusted_rand_score(expected, labels) >= 0.99


def test_kmeans_on_subsample(phantom, device):
    out = _labels(
        run_processor("kmeans", phantom.values, SPACING, device, k=3, sample_size=5000, **WHOLE)
    )
    x, _, _ = build_features(np, Volume(phantom.values, spacing=SPACING), 0.0)
    pick = sample_index(np, x.shape[0], KMeansParams(k=3, sample_size=5000))
    assert pick is not None and len(np.unique(pick)) == 5000 and (np.diff(pick) > 0).all()
    expected = KMeans(n_clusters=3, n_init=1, random_state=0).fit(x[pick]).predict(x)
    assert adjusted_rand_score(expected, out.ravel()) >= 0.99


def test_kmeans_bad_k():
    with pytest.raises(pydantic.ValidationError, match="k"):
        run_processor("kmeans", np.zeros((2, 2, 2), np.float32), k=1)


@pytest.mark.parametrize("spatial_weight", [0.0, 0.5])
def test_kmeans_clusters_inside_the_body(phantom, device, spatial_weight):
    volume = Volume(phantom.values, spacing=SPACING, modality="CT")
    out = _labels(
        run_processor("kmeans", volume, device=device, k=3, spatial_weight=spatial_weight)
    )
    inside = body_mask(np, volume)
    assert (out[~inside] == 0).all() and (out[inside] > 0).all()
    x, _, _ = build_features(np, volume, spatial_weight, inside)
    expected = KMeans(n_clusters=3, n_init=1, random_state=0).fit_predict(x)
    assert adjusted_rand_score(expected, out[inside]) >= 0.99
    # Lung, soft tissue and bone: the air around the phantom takes no class.
    assert np.median(out[phantom.labels["lung"]]) == 1
    assert np.median(out[phantom.labels["bone"]]) == 3


@pytest.mark.parametrize("name", REAL_MRS)
def test_kmeans_on_real_mr_spends_no_class_on_the_air(name, device):
    """On the main branch the darkest class was mostly the air around the patient (69% of
    it outside the shoulder, 84% outside the abdomen): now each class lies in the body."""
    volume = real_volume(name)
    result = _label_result(run_processor("kmeans", volume, device=device))
    labels = to_numpy(result.labels)
    body = reference_body(name)
    assert [s.label for s in result.segments] == [1, 2, 3]
    for segment in result.segments:
        assert (~body[labels == segment.label]).mean() < 0.05, segment.name
        assert segment.type == Codes.TISSUE
    assert [s.name for s in result.segments] == [
        "Tissue class 1 of 3 (low intensity)",
        "Tissue class 2 of 3 (intermediate intensity)",
        "Tissue class 3 of 3 (high intensity)",
    ]


@pytest.mark.parametrize("name", ["ct_table", "explicit_VR-UN.dcm"])
def test_kmeans_names_ct_classes_by_their_hu(name, device):
    results = run_processor("kmeans", real_volume(name), device=device, k=4)
    segments = _label_result(results).segments
    stats = next(r for r in results if isinstance(r, MeasurementResult))
    assert [s.type for s in segments] == [Codes.AIR, FAT, Codes.SOFT_TISSUE, Codes.BONE]
    for segment, tissue in zip(segments, CT_TISSUES, strict=True):
        # The class's own voxels, not only its centre, are fat-, soft-tissue- or bone-like.
        assert tissue.lower <= stats.value("Mean", segment.label) < tissue.upper
        assert segment.name.startswith(tissue.name) and segment.name.endswith(" HU)")
    assert FAT.meaning == "Fat" and segments[1].category == Codes.TISSUE


def test_kmeans_without_a_body_says_so():
    air = Volume(np.full((2, 16, 16), -1000.0, np.float32), modality="CT")
    with pytest.raises(ProcessorError, match="inside_body=false"):
        run_processor("kmeans", air)


def test_kmeans_body_params_are_bounded():
    with pytest.raises(pydantic.ValidationError, match="body_min_area_fraction"):
        run_processor("kmeans", np.zeros((2, 2, 2), np.float32), body_min_area_fraction=2)


def test_sample_index_is_a_uniform_subset_without_repeats():
    n, size = 10_000, 2_000
    counts = np.zeros(n)
    for seed in range(200):
        pick = sample_index(np, n, KMeansParams(sample_size=size, seed=seed))
        assert pick is not None and pick.size == size
        assert (np.diff(pick) > 0).all() and pick[0] >= 0 and pick[-1] < n
        counts[pick] += 1
    # Each row is picked with probability size / n = 0.2: 40 times in 200 draws, give or
    # take a binomial spread (sd ~5.7); by tenths of the range, no region is favoured.
    assert abs(counts.mean() - 40) < 1e-9
    by_tenth = counts.reshape(10, -1).mean(axis=1)
    assert np.all(np.abs(by_tenth - 40) < 1.0)
    assert sample_index(np, n, KMeansParams(sample_size=n)) is None
