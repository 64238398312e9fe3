"""Score a registered model on a local labelled set (``dicom-node models evaluate``).

The set is a folder, searched recursively, of DICOM image series and their truth:

- a segmenter: DICOM SEG files, each referencing the image series it labels. Segments
  match the model's labels by name (``SegmentLabel`` equal to the manifest label's
  ``name``, case aside), else by number. The model runs on each series as a job runs it
  (default parameters); Dice per label compares the label maps on the series' grid.
- a classifier or regressor: ``labels.csv`` with the columns ``series`` (a
  SeriesInstanceUID, or a folder under the set holding one series) and ``label`` (a
  class name, or a number for a regressor).

The figures are ``dicom_node.models_eval``'s; series that cannot be used are listed with
why, and a set with no usable case is refused.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.models_eval import (
    classification_figures,
    regression_figures,
    segmentation_figures,
)
from dicom_node.process import scan_series
from dicom_node.security.crypto import read_dicom
from dicom_node.volume import SeriesError, load_series
from processors.base import ProcessorError, Volume
from processors.errors import BadInputError
from processors.model import load_segmentation_model, segment_volume
from processors.model_plugin import ModelRef
from processors.predict import load_model, predict_values

LABELS_FILE = "labels.csv"


class EvaluationError(BadInputError):
    """The labelled set cannot be used to score the model; the message says why."""


def evaluate(ref: ModelRef, data: Path) -> dict[str, Any]:
    """The model's figures on the labelled set in ``data``."""
    if not data.is_dir():
        raise EvaluationError(f"--data {data}: not a folder")
    series, _skipped = scan_series(data)
    skipped: list[dict[str, str]] = []
    if ref.kind == "segmentation":
        figures = _segmentation(ref, data, series, skipped)
    else:
        figures = _tabular(ref, data, series, skipped)
    return {
        **figures,
        "model": ref.name,
        "version": ref.version,
        "data": data.name,
        "skipped": skipped,
    }


# --- Segmenters ---------------------------------------------------------------------------


def _seg_files(data: Path) -> Iterator[tuple[Path, Any]]:
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        try:
            header = read_dicom(path, None, stop_before_pixels=True)
        except Exception:  # noqa: S112 (not DICOM: scan_series lists those)
            continue
        if str(header.get("Modality", "")) == "SEG":
            yield path, header


def _segmentation(
    ref: ModelRef, data: Path, series: dict[str, list[Path]], skipped: list[dict[str, str]]
) -> dict[str, Any]:
    import highdicom as hd

    model = load_segmentation_model(ref.path)
    labels = {item.label: item.name for item in model.manifest.labels}
    by_name = {name.lower(): number for number, name in labels.items()}
    cases: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    for path, header in _seg_files(data):
        where = str(path.relative_to(data))
        try:
            referenced = str(header.ReferencedSeriesSequence[0].SeriesInstanceUID)
        except (AttributeError, IndexError):
            skipped.append({"item": where, "reason": "the SEG references no series"})
            continue
        if referenced not in series:
            skipped.append({"item": where, "reason": "its image series is not in the set"})
            continue
        try:
            volume = load_series(series[referenced])
            seg = hd.seg.segread(path)
            truth = _truth_label_map(seg, volume, by_name, set(labels))
            predicted = segment_volume(model, volume, np)
        except (SeriesError, ProcessorError, ValueError, KeyError) as exc:
            skipped.append({"item": where, "reason": str(exc)[:300]})
            continue
        cases.append((truth, np.asarray(predicted)))
    if not cases:
        raise EvaluationError(
            f"--data {data}: no DICOM SEG with its image series to score {ref.name} on"
        )
    return segmentation_figures(cases, labels)


def _truth_label_map(
    seg: Any, volume: Volume, by_name: dict[str, int], numbers: set[int]
) -> np.ndarray[Any, Any]:
    """The SEG's segments as the model's label numbers, on the volume's slices."""
    out = np.zeros(volume.array.shape, dtype=np.uint16)
    for number in seg.segment_numbers:
        label_name = str(seg.get_segment_description(number).segment_label).lower()
        label = by_name.get(label_name, number if number in numbers else None)
        if label is None:
            continue
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids),
            segment_numbers=[number],
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
        out[np.asarray(mask) > 0] = label
    return out


# --- Classifiers and regressors -------------------------------------------------------------


def _read_labels(data: Path) -> list[tuple[str, str]]:
    path = data / LABELS_FILE
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"series", "label"} <= set(reader.fieldnames):
                raise EvaluationError(f"{path}: needs the columns 'series' and 'label'")
            rows = [(row["series"].strip(), row["label"].strip()) for row in reader]
    except FileNotFoundError:
        raise EvaluationError(f"--data {data}: no {LABELS_FILE} (columns series,label)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{path}: unreadable: {exc}") from None
    if not rows:
        raise EvaluationError(f"{path}: no rows")
    return rows


def _series_for(key: str, data: Path, series: dict[str, list[Path]]) -> list[Path]:
    if key in series:
        return series[key]
    folder = (data / key).resolve()
    inside = [paths for paths in series.values() if paths[0].resolve().is_relative_to(folder)]
    if len(inside) != 1:
        raise KeyError(f"{len(inside)} image series match (one is needed)")
    return inside[0]


def _tabular(
    ref: ModelRef, data: Path, series: dict[str, list[Path]], skipped: list[dict[str, str]]
) -> dict[str, Any]:
    model = load_model(Path(ref.path))
    truth: list[str] = []
    outputs: list[Any] = []
    for key, label in _read_labels(data):
        try:
            volume = load_series(_series_for(key, data, series))
            output = predict_values(model, volume, np)
            if model.task == "regression":
                float(label)
        except (SeriesError, ProcessorError, KeyError, ValueError) as exc:
            skipped.append({"item": key, "reason": str(exc).strip("'\"")[:300]})
            continue
        truth.append(label)
        outputs.append(output)
    if not truth:
        raise EvaluationError(f"--data {data}: no labelled series could be scored")
    if model.task == "regression":
        return regression_figures([float(t) for t in truth], [float(o) for o in outputs])
    classes = [str(c) for c in model.pipeline.classes_]
    names = list(model.class_names) or classes
    unknown = sorted(set(truth) - set(names))
    if unknown:
        raise EvaluationError(f"{LABELS_FILE}: labels {unknown} are not among the classes {names}")
    scores = np.vstack(outputs)
    predicted = [names[int(i)] for i in np.argmax(scores, axis=1)]
    return classification_figures(truth, predicted, scores, names, model.positive_class)
