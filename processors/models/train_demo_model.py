"""Train the demo models shipped with the ``predict`` processor, on generated phantoms.

    python -m processors.models.train_demo_model [--train 160] [--test 60] [--seed 0]

Writes ``demo-lesion-presence.skops`` (lesion present / absent: StandardScaler + SVC),
``demo-lesion-volume.skops`` (lesion volume in ml: random forest regressor) and
``MODEL_CARD.md`` with the measured held-out accuracy, next to this file.
Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import (
    accuracy_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from dicom_node.synthetic import make_phantom
from processors.base import Volume
from processors.features import FeaturesParams, compute_features
from processors.predict import MODEL_FORMAT

HERE = Path(__file__).parent
SHAPE = (24, 64, 64)
SPACING = (2.5, 3.0, 3.0)
FEATURE_PARAMS = FeaturesParams()
ABSENT_RADIUS = 0.1  # no voxel centre lies within 0.1 mm of the lesion centre on this grid
RADIUS_RANGE_MM = (4.0, 20.0)
NOISE_RANGE_HU = (8.0, 16.0)


@dataclass(frozen=True)
class Sample:
    features: dict[str, float]
    present: bool
    volume_ml: float


def make_sample(rng: np.random.Generator) -> Sample:
    present = bool(rng.random() < 0.5)
    radius = float(rng.uniform(*RADIUS_RANGE_MM)) if present else ABSENT_RADIUS
    noise = float(rng.uniform(*NOISE_RANGE_HU))
    phantom = make_phantom(
        SHAPE,
        SPACING,
        lesion_radius_mm=radius,
        noise_sigma=noise,
        seed=int(rng.integers(2**31)),
    )
    volume_ml = float(phantom.labels["lesion"].sum()) * math.prod(SPACING) / 1000.0
    features = compute_features(
        Volume(phantom.values, spacing=SPACING, modality="CT"), FEATURE_PARAMS, np
    )
    return Sample(features, volume_ml > 0, volume_ml)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    from skops.io import dump

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    train = [make_sample(rng) for _ in range(args.train)]
    test = [make_sample(rng) for _ in range(args.test)]
    names = tuple(train[0].features)
    x_train = np.array([[s.features[n] for n in names] for s in train])
    x_test = np.array([[s.features[n] for n in names] for s in test])
    y_train = np.array(["present" if s.present else "absent" for s in train])
    y_test = np.array(["present" if s.present else "absent" for s in test])
    v_train = np.array([s.volume_ml for s in train])
    v_test = np.array([s.volume_ml for s in test])

    classifier = Pipeline(
        [
            ("scale", StandardScaler()),
            ("svc", CalibratedClassifierCV(SVC(C=10.0, random_state=0), ensemble=False)),
        ]
    ).fit(x_train, y_train)
    regressor = Pipeline(
        [
            ("scale", StandardScaler()),
            ("forest", RandomForestRegressor(n_estimators=50, max_depth=6, random_state=0)),
        ]
    ).fit(x_train, v_train)

    predicted = classifier.predict(x_test)
    positive = list(classifier.classes_).index("present")
    scores = classifier.predict_proba(x_test)[:, positive]
    volumes = regressor.predict(x_test)
    metrics = {
        "train_phantoms": args.train,
        "test_phantoms": args.test,
        "seed": args.seed,
        "presence_accuracy": float(accuracy_score(y_test, predicted)),
        "presence_roc_auc": float(roc_auc_score(y_test == "present", scores)),
        "test_present_fraction": float(np.mean(y_test == "present")),
        "volume_mae_ml": float(mean_absolute_error(v_test, volumes)),
        "volume_r2": float(r2_score(v_test, volumes)),
        "volume_test_range_ml": [float(v_test.min()), float(v_test.max())],
        "seconds": round(time.perf_counter() - started, 1),
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }
    common = {
        "format": MODEL_FORMAT,
        "version": "1.0.0",
        "feature_names": list(names),
        "feature_params": FEATURE_PARAMS.model_dump(mode="json"),
        "metrics": json.dumps(metrics),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    dump(
        {
            **common,
            "name": "demo-lesion-presence",
            "task": "classification",
            "pipeline": classifier,
            "target": "Lesion presence",
            "class_names": [str(c) for c in classifier.classes_],
            "positive_class": "present",
        },
        args.out / "demo-lesion-presence.skops",
    )
    dump(
        {
            **common,
            "name": "demo-lesion-volume",
            "task": "regression",
            "pipeline": regressor,
            "target": "Lesion volume",
            "unit": ["ml", "UCUM", "milliliter"],
        },
        args.out / "demo-lesion-volume.skops",
    )
    (args.out / "MODEL_CARD.md").write_text(card(metrics, names), encoding="utf-8")
    print(json.dumps(metrics, indent=2))


def card(metrics: dict[str, Any], names: tuple[str, ...]) -> str:
    radius = f"{RADIUS_RANGE_MM[0]:g}-{RADIUS_RANGE_MM[1]:g}"
    noise = f"{NOISE_RANGE_HU[0]:g}-{NOISE_RANGE_HU[1]:g}"
    low, high = metrics["volume_test_range_ml"]
    return f"""# Demo models: lesion presence and lesion volume

**Not for clinical use.** These models exist to demonstrate and test the `predict`
processor end to end. They were trained on synthetic phantoms only.

## Models

- `demo-lesion-presence.skops`: classification, lesion `present` / `absent`.
  StandardScaler + SVC (RBF, C=10), probabilities calibrated by
  CalibratedClassifierCV (sigmoid, 5-fold).
- `demo-lesion-volume.skops`: regression, lesion volume in ml (UCUM `ml`).
  StandardScaler + random forest (50 trees, depth <= 6).

Input: the {len(names)} features of the `features` processor with its default parameters
(region = voxels above -500 HU, 3 representative slices): first-order statistics, GLCM
texture, SIFT keypoint and Haar-like statistics. The feature names and parameters are
stored in the model file, and `predict` recomputes exactly those.

## Data

Generated by `processors/models/train_demo_model.py` with `dicom_node.synthetic.make_phantom`:
CT phantoms of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} voxels at {SPACING} mm (z, y, x): an
elliptical body (40 HU) with two lungs (-850 HU), a spine (700 HU) and, in half of the
cases, a spherical lesion (90 HU) of radius uniform in {radius} mm;
Gaussian noise with sigma uniform in {noise} HU.
{metrics["train_phantoms"]} training and {metrics["test_phantoms"]} held-out phantoms,
seed {metrics["seed"]}.
Anatomy, position of the lesion and grid are the same in every phantom: the models learn
nothing about real patients, other grids, other scanners or other lesion sites.

## Measured on the held-out phantoms

| metric | value |
| --- | --- |
| presence accuracy | {metrics["presence_accuracy"]:.3f} |
| presence ROC AUC | {metrics["presence_roc_auc"]:.3f} |
| fraction with a lesion in the test set | {metrics["test_present_fraction"]:.2f} |
| volume mean absolute error | {metrics["volume_mae_ml"]:.2f} ml |
| volume R^2 | {metrics["volume_r2"]:.3f} |
| test lesion volumes | {low:.1f}-{high:.1f} ml |

Trained in {metrics["seconds"]} s with scikit-learn {metrics["sklearn"]},
Python {metrics["python"]}.
Retrain with `python -m processors.models.train_demo_model`.

## Loading

Stored with `skops.io` and loaded only after every type in the file is checked against an
allow-list (scikit-learn, NumPy, SciPy sparse, builtins): never pickle.
"""


if __name__ == "__main__":
    main()
