"""Scoring registered models on labelled sets: a classifier and a regressor from
``labels.csv``, a segmenter from DICOM SEG ground truth made with highdicom. The
expected figures come from scikit-learn and SciPy applied to what the processors
themselves answer for each series."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from scipy.spatial.distance import dice as dice_dissimilarity
from sklearn import metrics
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.config import Settings
from dicom_node.model_evaluation import EvaluationError, evaluate
from dicom_node.model_registry import register_upload, stage_upload, version_ref
from dicom_node.security.audit import Actor
from dicom_node.synthetic import SyntheticSeries, generate_series
from dicom_node.testing import local_settings
from dicom_node.volume import load_series
from processors.api import run_processor
from processors.base import MeasurementResult
from processors.model import UNET_MANIFEST, load_segmentation_model, segment_volume
from processors.model_plugin import ModelRef

MODELS = Path(__file__).parents[2] / "processors" / "models"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return local_settings(tmp_path)


@pytest.fixture
def sessions(settings: Settings) -> sessionmaker[Session]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    return make_sessionmaker(make_engine(settings.effective_database_url))


def register(
    settings: Settings, sessions: sessionmaker[Session], path: Path, manifest: str | None = None
) -> ModelRef:
    with open(path, "rb") as source, sessions.begin() as session:
        staged = stage_upload(source, settings)
        row = register_upload(session, settings, staged, manifest, Actor.os_user())
        return version_ref(settings, row)


def training_like_series(index: int, radius_mm: float) -> SyntheticSeries:
    """A phantom on the demo models' training grid (24 x 64 x 64 at 2.5 x 3 x 3 mm)."""
    return generate_series(
        num_slices=24,
        rows=64,
        columns=64,
        pixel_spacing=3.0,
        slice_thickness=2.5,
        lesion_radius_mm=radius_mm,
        seed=index,
        uid_seed=f"evaluate-{index}",
        table=False,
    )


RADII = (0.1, 14.0, 0.1, 6.0, 18.0)


def labelled_set(root: Path, label: str) -> tuple[Path, list[SyntheticSeries]]:
    """Series in folders ``case-N``; ``labels.csv`` names half by folder, half by UID,
    plus a row for a series that is not there."""
    data = root / "set"
    cases = [training_like_series(i, r) for i, r in enumerate(RADII)]
    data.mkdir(parents=True)
    with open(data / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["series", "label"])
        for index, case in enumerate(cases):
            case.write(data / f"case-{index}")
            key = f"case-{index}" if index % 2 else case.series_instance_uid
            writer.writerow([key, label_of(case, label)])
        writer.writerow(["case-missing", "absent" if label == "presence" else "0"])
    return data, cases


def label_of(case: SyntheticSeries, kind: str) -> str:
    lesion = case.phantom.labels["lesion"]
    if kind == "presence":
        return "present" if lesion.any() else "absent"
    return repr(float(lesion.sum()) * math.prod(case.spacing) / 1000.0)


def processor_answer(case: SyntheticSeries, model: Path) -> MeasurementResult:
    [result] = run_processor("predict", load_series(case.datasets), model=str(model))
    assert isinstance(result, MeasurementResult)
    return result


def test_a_classifier_is_scored_per_class_from_labels_csv(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    model = MODELS / "demo-lesion-presence.skops"
    ref = register(settings, sessions, model)
    data, cases = labelled_set(tmp_path, "presence")
    figures = evaluate(ref, data)

    truth = [label_of(case, "presence") for case in cases]
    predicted = [processor_answer(case, model).classifications[0].label for case in cases]
    assert figures["cases"] == len(cases)
    assert [item["item"] for item in figures["skipped"]] == ["case-missing"]
    assert (
        figures["confusion_matrix"]
        == metrics.confusion_matrix(truth, predicted, labels=["absent", "present"]).tolist()
    )
    assert figures["per_class"]["present"]["recall"] == pytest.approx(
        metrics.recall_score(truth, predicted, pos_label="present"), abs=1e-4
    )
    assert figures["class_balance"]["present"]["count"] == truth.count("present")
    assert figures["roc_auc"] is not None and (figures["model"], figures["version"]) == (
        "demo-lesion-presence",
        "1.0.0",
    )


def test_a_regressor_is_scored_by_mae_and_r2(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    model = MODELS / "demo-lesion-volume.skops"
    ref = register(settings, sessions, model)
    data, cases = labelled_set(tmp_path, "volume")
    figures = evaluate(ref, data)

    truth = [float(label_of(case, "volume")) for case in cases]
    predicted = [processor_answer(case, model).measurements[0].value for case in cases]
    assert figures["task"] == "regression" and figures["cases"] == len(cases)
    assert figures["mae"] == pytest.approx(metrics.mean_absolute_error(truth, predicted), abs=1e-4)
    assert figures["r2"] == pytest.approx(metrics.r2_score(truth, predicted), abs=1e-4)


def ground_truth_seg(case: SyntheticSeries, labels: np.ndarray) -> hd.seg.Segmentation:
    """A SEG of ``labels`` (1 lung, 2 lesion) numbered the other way round (1 Lesion,
    2 Lung): the evaluation must match segments by name."""
    renumbered = np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=hd.sr.CodedConcept(*category),
            segmented_property_type=hd.sr.CodedConcept(*kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name, category, kind in (
            (1, "Lesion", ("49755003", "SCT", "Morphologic"), ("52988006", "SCT", "Lesion")),
            (2, "Lung", ("91723000", "SCT", "Anatomical"), ("39607008", "SCT", "Lung")),
        )
    ]
    return hd.seg.Segmentation(
        source_images=case.datasets,
        pixel_array=renumbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="truth",
        software_versions="1",
        device_serial_number="1",
    )


def test_a_segmenter_is_scored_by_dice_per_label_from_seg_ground_truth(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    document = json.loads(UNET_MANIFEST.read_text())
    ref = register(
        settings,
        sessions,
        UNET_MANIFEST.parent / document["model"],
        json.dumps({**document, "name": "lungs"}),
    )
    case = generate_series(
        num_slices=16, rows=64, columns=64, pixel_spacing=2.0, slice_thickness=2.5,
        lesion_radius_mm=12.0, uid_seed="evaluate-seg", table=False,
    )  # fmt: skip
    truth = np.zeros(case.phantom.values.shape, dtype=np.uint8)
    truth[case.phantom.labels["lung"]] = 1
    truth[case.phantom.labels["lesion"]] = 2
    data = tmp_path / "set"
    case.write(data / "images")
    ground_truth_seg(case, truth).save_as(data / "truth.dcm")

    figures = evaluate(ref, data)
    predicted = segment_volume(load_segmentation_model(ref.path), load_series(case.datasets), np)
    assert figures["task"] == "segmentation" and figures["cases"] == 1
    for label, name in ((1, "Lung"), (2, "Lesion")):
        expected = 1 - dice_dissimilarity((truth == label).ravel(), (predicted == label).ravel())
        assert figures["per_label"][name]["dice_pooled"] == pytest.approx(expected, abs=1e-4)
    assert figures["per_label"]["Lung"]["dice_pooled"] > 0.5  # the names were matched


def test_a_set_without_truth_is_refused_with_the_reason(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ref = register(settings, sessions, MODELS / "demo-lesion-volume.skops")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=r"no labels\.csv"):
        evaluate(ref, tmp_path / "empty")
