"""The figures a model is judged by, checked against scikit-learn's and SciPy's own
functions on known arrays (and counts worked out by hand), not against this module."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import dice as dice_dissimilarity
from sklearn import metrics

from dicom_node.models_eval import (
    classification_figures,
    dice,
    regression_figures,
    segmentation_figures,
)

# 20 cases, 2 positives: a classifier that finds one of them, with one false alarm.
TRUTH = ["absent"] * 18 + ["present"] * 2
PREDICTED = ["absent"] * 17 + ["present"] + ["present", "absent"]
SCORES_PRESENT = np.array([0.1] * 16 + [0.3, 0.7] + [0.9, 0.2])
SCORES = np.column_stack([1 - SCORES_PRESENT, SCORES_PRESENT])


def test_an_imbalanced_classifier_shows_its_minority_class_not_just_accuracy() -> None:
    figures = classification_figures(TRUTH, PREDICTED, SCORES, ["absent", "present"], "present")
    present = figures["per_class"]["present"]
    # By hand: TP 1, FP 1, FN 1 for "present"; 17 of 18 "absent" right.
    assert (present["precision"], present["recall"], present["f1"]) == (0.5, 0.5, 0.5)
    assert present["support"] == 2
    assert figures["confusion_matrix"] == [[17, 1], [1, 1]]
    assert figures["class_balance"]["present"] == {"count": 2, "share": 0.1}
    assert figures["accuracy"] == 0.9  # high, though half the positives are missed
    assert figures["balanced_accuracy"] == pytest.approx(
        metrics.balanced_accuracy_score(TRUTH, PREDICTED), abs=1e-4
    )
    assert figures["macro"]["f1"] == pytest.approx(
        metrics.f1_score(TRUTH, PREDICTED, average="macro"), abs=1e-4
    )
    assert figures["macro"]["recall"] == pytest.approx(
        metrics.recall_score(TRUTH, PREDICTED, average="macro"), abs=1e-4
    )
    truth_positive = np.array(TRUTH) == "present"
    assert figures["roc_auc"] == pytest.approx(
        metrics.roc_auc_score(truth_positive, SCORES_PRESENT), abs=1e-4
    )
    # Mann-Whitney: the share of (positive, negative) pairs the score ranks right.
    pairs = [
        (p, n) for p in SCORES_PRESENT[truth_positive] for n in SCORES_PRESENT[~truth_positive]
    ]
    right = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs)
    assert figures["roc_auc"] == pytest.approx(right / len(pairs), abs=1e-4)


def test_three_classes_give_one_vs_rest_macro_auc_and_figures_per_class() -> None:
    truth = ["a", "a", "b", "b", "c", "c", "c"]
    predicted = ["a", "b", "b", "b", "c", "a", "c"]
    rng = np.random.default_rng(0)
    scores = rng.dirichlet([1, 1, 1], size=len(truth))
    figures = classification_figures(truth, predicted, scores, ["a", "b", "c"])
    recalls = metrics.recall_score(truth, predicted, average=None, labels=["a", "b", "c"])
    assert [figures["per_class"][k]["recall"] for k in "abc"] == pytest.approx(recalls, abs=1e-4)
    assert figures["roc_auc"] == pytest.approx(
        metrics.roc_auc_score(truth, scores, multi_class="ovr", labels=["a", "b", "c"]), abs=1e-4
    )
    assert np.sum(figures["confusion_matrix"]) == len(truth)


def test_auc_is_undefined_with_one_class_in_the_truth() -> None:
    figures = classification_figures(["a", "a"], ["a", "b"], np.array([[0.9, 0.1], [0.4, 0.6]]))
    assert figures["roc_auc"] is None
    assert figures["per_class"]["b"]["precision"] == 0.0


def test_regression_figures_match_scikit_learn() -> None:
    truth = [0.0, 1.5, 3.0, 10.0, 4.2]
    predicted = [0.5, 1.0, 3.5, 8.0, 4.0]
    figures = regression_figures(truth, predicted)
    assert figures["mae"] == pytest.approx(np.mean(np.abs(np.subtract(truth, predicted))), abs=1e-4)
    residual = np.sum(np.subtract(truth, predicted) ** 2)
    total = np.sum((np.array(truth) - np.mean(truth)) ** 2)
    assert figures["r2"] == pytest.approx(1 - residual / total, abs=1e-4)
    assert figures["truth_range"] == [0.0, 10.0]


def test_dice_per_label_pooled_and_per_case_against_scipy() -> None:
    rng = np.random.default_rng(1)
    cases = [(rng.integers(0, 3, (4, 8, 8)), rng.integers(0, 3, (4, 8, 8))) for _ in range(3)]
    figures = segmentation_figures(cases, {1: "Lung", 2: "Lesion"})
    for label, name in ((1, "Lung"), (2, "Lesion")):
        truth = np.concatenate([t.ravel() == label for t, _ in cases])
        predicted = np.concatenate([p.ravel() == label for _, p in cases])
        expected = 1 - dice_dissimilarity(truth, predicted)
        assert figures["per_label"][name]["dice_pooled"] == pytest.approx(expected, abs=1e-4)
        per_case = [
            1 - dice_dissimilarity(t.ravel() == label, p.ravel() == label) for t, p in cases
        ]
        assert figures["per_label"][name]["dice_mean_per_case"] == pytest.approx(
            np.mean(per_case), abs=1e-4
        )
    assert dice(np.zeros(3), np.zeros(3)) == 1.0


def test_a_label_absent_everywhere_has_no_dice() -> None:
    truth = np.array([[0, 1], [1, 0]])
    figures = segmentation_figures([(truth, truth)], {1: "Lung", 2: "Lesion"})
    assert figures["per_label"]["Lung"]["dice_pooled"] == 1.0
    assert figures["per_label"]["Lesion"] == {
        "label": 2,
        "dice_pooled": None,
        "dice_mean_per_case": None,
        "cases_with_label": 0,
    }
    assert figures["mean_dice"] == 1.0
