"""Train the demo models shipped with the ``predict`` processor, on generated phantoms.

    python -m processors.models.train_demo_model [--train 160] [--test 60] [--seed 0]
    python -m processors.models.train_demo_model --evaluate-only   # re-measure, rewrite the card

Writes ``demo-lesion-presence.skops`` (lesion present / absent: StandardScaler + SVC),
``demo-lesion-volume.skops`` (lesion volume in ml: random forest regressor) and
``MODEL_CARD.md`` with the figures measured on the held-out phantoms by
``dicom_node.models_eval`` (what ``dicom-node models evaluate`` reports), next to this
file. Deterministic for a given seed: ``--evaluate-only`` draws the same phantoms and
scores the shipped files.
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
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from dicom_node.models_eval import classification_figures, regression_figures
from dicom_node.synthetic import make_phantom
from processors.base import Volume
from processors.features import FeaturesParams, compute_features
from processors.predict import MODEL_FORMAT, load_model

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
    parser.add_argument(
        "--evaluate-only", action="store_true", help="score the shipped files, rewrite the card"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    train = [make_sample(rng) for _ in range(args.train)]
    test = [make_sample(rng) for _ in range(args.test)]
    names = tuple(train[0].features)
    x_train = np.array([[s.features[n] for n in names] for s in train])
    x_test = np.array([[s.features[n] for n in names] for s in test])
    y_train = np.array(["present" if s.present else "absent" for s in train])
    v_train = np.array([s.volume_ml for s in train])
    if args.evaluate_only:
        classifier = load_model(args.out / "demo-lesion-presence.skops").pipeline
        regressor = load_model(args.out / "demo-lesion-volume.skops").pipeline
    else:
        classifier, regressor = fit(x_train, y_train, v_train)
    metrics = {
        "train_phantoms": args.train,
        "test_phantoms": args.test,
        "seed": args.seed,
        **held_out_figures(classifier, regressor, x_test, test),
        "seconds": round(time.perf_counter() - started, 1),
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.evaluate_only:
        save(args.out, classifier, regressor, names, metrics)
    (args.out / "MODEL_CARD.md").write_text(card(metrics, names), encoding="utf-8")
    print(json.dumps(metrics, indent=2))


def fit(x_train: Any, y_train: Any, v_train: Any) -> tuple[Any, Any]:
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
    return classifier, regressor


def held_out_figures(
    classifier: Any, regressor: Any, x_test: Any, test: list[Sample]
) -> dict[str, Any]:
    """The figures of ``dicom-node models evaluate`` on the held-out phantoms."""
    classes = [str(c) for c in classifier.classes_]
    truth = ["present" if s.present else "absent" for s in test]
    scores = classifier.predict_proba(x_test)
    predicted = [classes[int(i)] for i in np.argmax(scores, axis=1)]
    volumes = [s.volume_ml for s in test]
    return {
        "presence": classification_figures(truth, predicted, scores, classes, "present"),
        "volume": regression_figures(volumes, [float(v) for v in regressor.predict(x_test)]),
    }


def save(out: Path, classifier: Any, regressor: Any, names: tuple[str, ...], metrics: Any) -> None:
    from skops.io import dump

    common = {
        "format": MODEL_FORMAT,
        "version": "1.0.0",
        "feature_names": list(names),
        "feature_params": FEATURE_PARAMS.model_dump(mode="json"),
        "metrics": json.dumps(metrics),
    }
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
        out / "demo-lesion-presence.skops",
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
        out / "demo-lesion-volume.skops",
    )


def card(metrics: dict[str, Any], names: tuple[str, ...]) -> str:
    radius = f"{RADIUS_RANGE_MM[0]:g}-{RADIUS_RANGE_MM[1]:g}"
    noise = f"{NOISE_RANGE_HU[0]:g}-{NOISE_RANGE_HU[1]:g}"
    presence = metrics["presence"]
    volume = metrics["volume"]
    low, high = volume["truth_range"]
    class_rows = "\n".join(
        f"| {name} | {presence['class_balance'][name]['count']} "
        f"({100 * presence['class_balance'][name]['share']:.0f} %) | {item['precision']:.3f} | "
        f"{item['recall']:.3f} | {item['f1']:.3f} |"
        for name, item in presence["per_class"].items()
    )
    macro = presence["macro"]
    (tn, fp), (fn, tp) = presence["confusion_matrix"]
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

The figures of `dicom-node models evaluate` (`dicom_node.models_eval`), on the
{presence["cases"]} held-out phantoms.

Lesion presence, per class (a class's recall is its sensitivity: the share of its cases
the model finds; for `absent` it is the specificity):

| class | cases (share) | precision | recall | F1 |
| --- | --- | --- | --- | --- |
{class_rows}
| macro mean | | {macro["precision"]:.3f} | {macro["recall"]:.3f} | {macro["f1"]:.3f} |

Confusion matrix (rows: truth, columns: prediction): {tn} absent and {tp} present
called right, {fp} absent called present, {fn} present called absent. Accuracy
{presence["accuracy"]:.3f}, balanced accuracy {presence["balanced_accuracy"]:.3f}, ROC AUC
of the `present` probability {presence["roc_auc"]:.3f}. The set is nearly balanced; on a
set where lesions are rare, read the `present` recall and the macro figures, not the
accuracy.

Lesion volume: mean absolute error {volume["mae"]:.2f} ml, root mean squared error
{volume["rmse"]:.2f} ml, R^2 {volume["r2"]:.3f}, over lesion volumes of
{low:.1f}-{high:.1f} ml.

Measured in {metrics["seconds"]} s with scikit-learn {metrics["sklearn"]},
Python {metrics["python"]}, by
`python -m processors.models.train_demo_model --evaluate-only` (the same phantoms, the
shipped files). Retrain with `python -m processors.models.train_demo_model`.

## Loading

Stored with `skops.io` and loaded only after every type in the file is checked against an
allow-list (scikit-learn, NumPy, SciPy sparse, builtins): never pickle.
"""


if __name__ == "__main__":
    main()
