"""How a model is judged: the figures ``dicom-node models evaluate`` reports and the
shipped models' cards show. Pure functions on arrays (no files, no database).

- Classifiers: the class balance (count and share of each class), per class precision,
  recall (sensitivity), F1 and support, their macro means (each class counts the same,
  however rare), accuracy and balanced accuracy (the macro recall), the confusion matrix
  (rows: truth, columns: prediction, in ``classes`` order) and ROC AUC (binary: of the
  positive class's score; more classes: one-vs-rest, macro). On imbalanced data accuracy
  says little (always answering the majority class scores its share); read the
  minority class's recall and the macro figures.
- Regressors: mean absolute error, root mean squared error, R² (1 - residual / total sum
  of squares; 0 is no better than predicting the mean).
- Segmenters: Dice per label, pooled over every voxel of every case (large structures
  weigh more) and the mean over the cases that hold the label in truth or prediction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn import metrics

FIGURES_DIGITS = 4


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), FIGURES_DIGITS)


def classification_figures(
    truth: Sequence[str],
    predicted: Sequence[str],
    scores: np.ndarray[Any, Any] | None = None,
    classes: Sequence[str] | None = None,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """The figures of a classifier; ``scores`` (n, len(classes)) are the probabilities of
    each of ``classes`` (default: the sorted labels seen), for ROC AUC."""
    if len(truth) != len(predicted) or not truth:
        raise ValueError("truth and predictions must be non-empty and of one length")
    names = list(classes) if classes is not None else sorted({*truth, *predicted})
    y_true = np.asarray(truth, dtype=object)
    y_pred = np.asarray(predicted, dtype=object)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=names, zero_division=0.0
    )
    counts = {name: int(np.sum(y_true == name)) for name in names}
    figures: dict[str, Any] = {
        "task": "classification",
        "cases": len(truth),
        "classes": names,
        "class_balance": {
            name: {"count": counts[name], "share": _round(counts[name] / len(truth))}
            for name in names
        },
        "per_class": {
            name: {
                "precision": _round(precision[i]),
                "recall": _round(recall[i]),
                "f1": _round(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "macro": {
            "precision": _round(float(np.mean(precision))),
            "recall": _round(float(np.mean(recall))),
            "f1": _round(float(np.mean(f1))),
        },
        "accuracy": _round(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _round(float(np.mean(recall[support > 0]))),
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=names).tolist(),
        "roc_auc": None,
    }
    if scores is not None:
        score_array = np.asarray(scores, dtype=float)
        figures["roc_auc"] = _roc_auc(y_true, score_array, names, positive_class)
    return figures


def _roc_auc(
    y_true: np.ndarray[Any, Any],
    scores: np.ndarray[Any, Any],
    names: list[str],
    positive_class: str | None,
) -> float | None:
    present = sorted(set(y_true.tolist()))
    if len(present) < 2:
        return None  # undefined with one class in the truth
    if scores.shape != (len(y_true), len(names)):
        raise ValueError(f"scores {scores.shape} do not match {len(y_true)} cases x {names}")
    if len(names) == 2:
        positive = positive_class if positive_class is not None else names[1]
        column = names.index(positive)
        return _round(metrics.roc_auc_score(y_true == positive, scores[:, column]))
    columns = [names.index(name) for name in present]
    probabilities = scores[:, columns]
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    return _round(metrics.roc_auc_score(y_true, probabilities, multi_class="ovr", labels=present))


def regression_figures(truth: Sequence[float], predicted: Sequence[float]) -> dict[str, Any]:
    y_true = np.asarray(truth, dtype=float)
    y_pred = np.asarray(predicted, dtype=float)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError("truth and predictions must be non-empty and of one length")
    return {
        "task": "regression",
        "cases": int(y_true.size),
        "mae": _round(metrics.mean_absolute_error(y_true, y_pred)),
        "rmse": _round(float(np.sqrt(metrics.mean_squared_error(y_true, y_pred)))),
        "r2": _round(metrics.r2_score(y_true, y_pred)) if y_true.size > 1 else None,
        "truth_range": [_round(float(y_true.min())), _round(float(y_true.max()))],
    }


def dice(truth: np.ndarray[Any, Any], predicted: np.ndarray[Any, Any]) -> float:
    """2|A∩B| / (|A|+|B|) of two masks; 1.0 when both are empty."""
    a = np.asarray(truth, dtype=bool)
    b = np.asarray(predicted, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def segmentation_figures(
    cases: Iterable[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]],
    labels: dict[int, str],
) -> dict[str, Any]:
    """Dice per label of (truth, predicted) label maps; ``labels``: number -> name."""
    intersection = dict.fromkeys(labels, 0)
    sizes = dict.fromkeys(labels, 0)
    per_case: dict[int, list[float]] = {label: [] for label in labels}
    count = 0
    for truth, predicted in cases:
        if truth.shape != predicted.shape:
            raise ValueError(f"truth {truth.shape} and prediction {predicted.shape} differ")
        count += 1
        for label in labels:
            a = truth == label
            b = predicted == label
            intersection[label] += int(np.logical_and(a, b).sum())
            sizes[label] += int(a.sum()) + int(b.sum())
            if a.any() or b.any():
                per_case[label].append(dice(a, b))
    if count == 0:
        raise ValueError("no cases to evaluate")
    pooled = {
        label: (2.0 * intersection[label] / sizes[label]) if sizes[label] else float("nan")
        for label in labels
    }
    return {
        "task": "segmentation",
        "cases": count,
        "per_label": {
            name: {
                "label": label,
                "dice_pooled": _round(pooled[label]),
                "dice_mean_per_case": _round(float(np.mean(per_case[label])))
                if per_case[label]
                else None,
                "cases_with_label": len(per_case[label]),
            }
            for label, name in labels.items()
        },
        "mean_dice": _round(float(np.nanmean(list(pooled.values()))))
        if any(np.isfinite(v) for v in pooled.values())
        else None,
    }
