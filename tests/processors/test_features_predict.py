"""features against numpy/scipy.stats/scikit-image; predict with the shipped models."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pydantic
import pytest
import scipy.stats
from proc_testing import to_numpy
from skimage.feature import SIFT, graycomatrix, graycoprops, haar_like_feature
from skimage.transform import integral_image, resize

from dicom_node.synthetic import make_phantom
from processors.api import run_processor
from processors.base import MeasurementResult, ProcessorError, Volume
from processors.features import (
    GLCM_ANGLES,
    GLCM_PROPS,
    HAAR_TYPES,
    FeaturesParams,
    compute_features,
    glcm,
    glcm_props,
    quantise,
    representative_slices,
)
from processors.predict import check_types, load_model, model_path

SPACING = (2.5, 3.0, 3.0)


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return make_phantom((24, 64, 64), SPACING, lesion_radius_mm=12.0, seed=5).values


def _features(ct, device, **params) -> dict[str, float]:
    (result,) = run_processor(
        "features", Volume(ct, spacing=SPACING, modality="CT"), device=device, **params
    )
    assert isinstance(result, MeasurementResult)
    return {m.concept.meaning: m.value for m in result.measurements}


def test_first_order_matches_numpy_and_scipy(ct, device):
    values = _features(ct, device, sift=False, haar=False)
    region = ct[ct > -500].astype(np.float64)
    assert values["Mean"] == pytest.approx(region.mean(), rel=1e-9)
    assert values["Standard Deviation"] == pytest.approx(region.std(), rel=1e-9)
    assert values["Median"] == pytest.approx(np.median(region), rel=1e-9)
    assert values["Percentile 10"] == pytest.approx(np.percentile(region, 10), rel=1e-9)
    assert values["Skewness"] == pytest.approx(scipy.stats.skew(region), rel=1e-6)
    assert values["Kurtosis"] == pytest.approx(scipy.stats.kurtosis(region), rel=1e-6)
    p = np.histogram(region, bins=64, range=(region.min(), region.max()))[0] / region.size
    assert values["Entropy"] == pytest.approx(scipy.stats.entropy(p, base=2), rel=1e-9)
    assert values["Volume"] == pytest.approx(region.size * math.prod(SPACING))


def test_glcm_matches_skimage(ct, xp):
    q = quantise(xp, xp.asarray(ct[12]), 32, -1000.0, 1000.0)
    ours = glcm(xp, q, 2, 32)
    expected = graycomatrix(
        to_numpy(q).astype(np.uint8),
        [2],
        list(GLCM_ANGLES),
        levels=32,
        symmetric=True,
        normed=True,
    )
    np.testing.assert_allclose(to_numpy(ours), expected, atol=1e-12)
    props = glcm_props(xp, ours)
    for name in GLCM_PROPS:
        assert props[name] == pytest.approx(float(graycoprops(expected, name).mean()), rel=1e-9)


def test_2d_features_match_skimage_on_representative_slices(ct):
    params = FeaturesParams()
    values = compute_features(Volume(ct, spacing=SPACING, modality="CT"), params, np)
    slices = representative_slices(np, ct > -500, params.n_slices)
    assert len(slices) == 3
    counts, haar_max = [], []
    for z in slices:
        unit = (ct[z] - ct[z].min()) / (ct[z].max() - ct[z].min())
        sift = SIFT(upsampling=1, n_octaves=4)
        sift.detect(unit.astype(np.float64))
        counts.append(len(sift.sigmas))
        small = resize(unit.astype(np.float64), (12, 12), anti_aliasing=True)
        haar = haar_like_feature(integral_image(small), 0, 0, 12, 12, list(HAAR_TYPES))
        haar_max.append(np.abs(haar).max())
    assert values["SIFT keypoints"] == pytest.approx(np.mean(counts))
    assert values["SIFT keypoints"] > 0
    assert values["Haar max abs"] == pytest.approx(np.mean(haar_max))


def test_features_bad_params():
    with pytest.raises(pydantic.ValidationError, match="glcm_range"):
        FeaturesParams(glcm_range=(5.0, 1.0))
    with pytest.raises(pydantic.ValidationError, match="n_slices"):
        run_processor("features", np.zeros((2, 2, 2), np.float32), n_slices=0)


def test_empty_region_is_a_clear_error():
    with pytest.raises(ProcessorError, match="region is empty"):
        run_processor("features", np.full((3, 8, 8), -1000.0, np.float32))


@pytest.mark.parametrize(("radius", "expected"), [(18.0, "present"), (0.1, "absent")])
def test_demo_presence_model(radius, expected):
    phantom = make_phantom((24, 64, 64), SPACING, lesion_radius_mm=radius, seed=991)
    (result,) = run_processor("predict", Volume(phantom.values, spacing=SPACING, modality="CT"))
    top = result.classifications[0]
    assert top.label == expected
    assert top.probability > 0.5
    assert sum(c.probability for c in result.classifications) == pytest.approx(1.0)


def test_demo_volume_model():
    phantom = make_phantom((24, 64, 64), SPACING, lesion_radius_mm=15.0, seed=992)
    truth_ml = phantom.labels["lesion"].sum() * math.prod(SPACING) / 1000.0
    (result,) = run_processor(
        "predict",
        Volume(phantom.values, spacing=SPACING, modality="CT"),
        model="demo-lesion-volume",
    )
    (measurement,) = result.measurements
    assert measurement.unit.value == "ml"
    assert measurement.value == pytest.approx(truth_ml, abs=3.0)


def test_models_load_only_from_skops_with_trusted_types(tmp_path):
    with pytest.raises(ProcessorError, match=r"\.skops"):
        model_path(str(tmp_path / "model.pkl"))
    with pytest.raises(ProcessorError, match="not found"):
        model_path(str(tmp_path / "missing.skops"))
    with pytest.raises(ProcessorError, match="allow-list"):
        check_types(["sklearn.svm.SVC", "os.system"])
    with pytest.raises(ProcessorError, match="allow-list"):
        check_types(["builtins.eval"])
    check_types(["sklearn.tree._tree.Tree", "numpy.float64"])
    model = load_model(model_path("demo-lesion-presence"))
    assert model.task == "classification" and len(model.feature_names) > 20


def test_untrusted_model_file_is_refused(tmp_path):
    from skops.io import dump

    class Sneaky:  # a type that is not on the allow-list
        pass

    path = tmp_path / "sneaky.skops"
    dump({"format": "dicom-node-model/1", "payload": Sneaky()}, path)
    with pytest.raises(ProcessorError, match="allow-list"):
        run_processor("predict", np.zeros((3, 8, 8), np.float32), model=str(path))


def test_a_model_replaced_on_disk_is_the_one_the_next_run_uses(tmp_path):
    path = tmp_path / "model.skops"
    volume = Volume(
        make_phantom((24, 64, 64), SPACING, seed=993).values, spacing=SPACING, modality="CT"
    )
    shutil.copyfile(model_path("demo-lesion-presence"), path)
    (before,) = run_processor("predict", volume, model=str(path))
    assert before.classifications and not before.measurements
    shutil.copyfile(model_path("demo-lesion-volume"), path)  # same path, another model
    (after,) = run_processor("predict", volume, model=str(path))
    assert after.measurements and not after.classifications
