"""Predict from image features with a scikit-learn pipeline stored as ``.skops``.

Models are read only from ``.skops`` files (never pickle), and only when every type the
file would instantiate is on an allow-list of scikit-learn / NumPy / SciPy types. A model
file holds a dict::

    {"format": "dicom-node-model/1", "name": ..., "version": ..., "task":
     "classification" | "regression", "pipeline": <sklearn estimator>, "feature_names":
     [...], "feature_params": {...FeaturesParams...}, "target": ..., "unit": [code, scheme,
     meaning] (regression), "class_names": [...] (classification), "positive_class": ...}

The model file is read once per version of the file and cached (``processors.file_cache``);
``run`` itself only stats the file after that.
The shipped demo models live in ``processors/models/`` (see its MODEL_CARD.md).
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from processors.base import (
    Classification,
    Code,
    Codes,
    Measurement,
    MeasurementResult,
    ProcessorError,
    ProcessorParams,
    Result,
    Volume,
)
from processors.features import FeaturesParams, compute_features
from processors.file_cache import cached_per_file_version

MODEL_FORMAT = "dicom-node-model/1"
MODELS_PACKAGE = "processors.models"

#: Type-name prefixes a model file may instantiate.
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.sparse.", "builtins.")
#: Exact names outside those prefixes that are fine (skops reports them this way).
TRUSTED_EXACT = frozenset({"collections.OrderedDict"})
#: Never, whatever the prefix.
FORBIDDEN = frozenset({"builtins.eval", "builtins.exec", "builtins.getattr", "builtins.open"})


class PredictParams(ProcessorParams):
    model: str = Field(
        default="demo-lesion-presence",
        min_length=1,
        description="a shipped model's name (processors/models/NAME.skops) or a .skops path",
    )


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    task: str
    pipeline: Any
    feature_names: tuple[str, ...]
    feature_params: FeaturesParams
    target: str
    unit: Code | None
    class_names: tuple[str, ...]
    positive_class: str | None


def model_path(model: str) -> Path:
    """The file for a shipped model name or an explicit ``.skops`` path."""
    if model.endswith(".skops") or "/" in model or "\\" in model:
        path = Path(model)
    else:
        path = Path(str(importlib.resources.files(MODELS_PACKAGE) / f"{model}.skops"))
    if path.suffix != ".skops":
        raise ProcessorError(f"models are read only from .skops files, not {path.name!r}")
    if not path.is_file():
        raise ProcessorError(f"model file not found: {path}")
    return path


def untrusted_types(path: Path) -> list[str]:
    from skops.io import get_untrusted_types

    names: list[str] = list(get_untrusted_types(file=path))
    return names


def check_types(names: list[str]) -> None:
    refused = [
        n
        for n in names
        if n in FORBIDDEN or not (n in TRUSTED_EXACT or n.startswith(TRUSTED_PREFIXES))
    ]
    if refused:
        raise ProcessorError(f"model file would load types outside the allow-list: {refused}")


@cached_per_file_version
def load_model(path: Path) -> LoadedModel:
    """Read and validate a model file (cached per version of the file, so a model
    replaced on disk is read and checked again)."""
    from skops.io import load

    names = untrusted_types(path)
    check_types(names)
    try:
        document = load(path, trusted=names)
    except Exception as exc:
        raise ProcessorError(f"{path.name}: cannot load model: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != MODEL_FORMAT:
        raise ProcessorError(f"{path.name}: not a {MODEL_FORMAT} document")
    task = document.get("task")
    if task not in ("classification", "regression"):
        raise ProcessorError(f"{path.name}: task must be classification or regression")
    pipeline = document["pipeline"]
    unit = document.get("unit")
    return LoadedModel(
        name=str(document.get("name", path.stem)),
        version=str(document.get("version", "")),
        task=str(task),
        pipeline=pipeline,
        feature_names=tuple(str(n) for n in document["feature_names"]),
        feature_params=FeaturesParams(**document.get("feature_params", {})),
        target=str(document.get("target", "prediction")),
        unit=Code(*unit) if unit else None,
        class_names=tuple(str(c) for c in document.get("class_names", ())),
        positive_class=document.get("positive_class"),
    )


def feature_vector(features: dict[str, float], names: tuple[str, ...]) -> Any:
    missing = [n for n in names if n not in features]
    if missing:
        raise ProcessorError(f"the model needs features this node does not compute: {missing}")
    return np.array([[features[n] for n in names]], dtype=np.float64)


class Predict:
    """Classification or regression from ``features`` with a trusted ``.skops`` pipeline."""

    name: ClassVar[str] = "predict"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "predict"
    Params: ClassVar[type[PredictParams]] = PredictParams

    def run(self, volume: Volume, params: PredictParams, xp: ModuleType) -> list[Result]:
        return predict_results(load_model(model_path(params.model)), volume, xp)


def predict_values(model: LoadedModel, volume: Volume, xp: ModuleType) -> Any:
    """The pipeline's output for one volume: the predicted value (regression) or the
    probability of each of ``model.pipeline.classes_`` (classification)."""
    features = compute_features(volume, model.feature_params, xp)
    x = feature_vector(features, model.feature_names)
    if model.task == "regression":
        return float(model.pipeline.predict(x)[0])
    return model.pipeline.predict_proba(x)[0]


def predict_results(model: LoadedModel, volume: Volume, xp: ModuleType) -> list[Result]:
    """What ``predict`` reports for ``volume``: a measurement or classifications (SR)."""
    output = predict_values(model, volume, xp)
    description = f"{model.name} {model.version}".strip()
    if model.task == "regression":
        value = float(output)
        concept = Codes.local(model.target.lower().replace(" ", "-"), model.target)
        unit = model.unit or Code("1", "UCUM", "no units")
        return [
            MeasurementResult(
                (Measurement(concept, value, unit, derivation=description),),
                description=f"Prediction by {description}",
            )
        ]
    probabilities = output
    classes = [str(c) for c in model.pipeline.classes_]
    names = list(model.class_names) or classes
    concept = Codes.local(model.target.lower().replace(" ", "-"), model.target)
    classifications = []
    for label, probability in sorted(
        zip(names, probabilities, strict=True), key=lambda pair: -pair[1]
    ):
        coded: Code | None = None
        if model.positive_class is not None:
            coded = Codes.PRESENT if label == model.positive_class else Codes.ABSENT
        classifications.append(
            Classification(concept, label, float(min(max(probability, 0.0), 1.0)), coded)
        )
    return [
        MeasurementResult(
            classifications=tuple(classifications),
            description=f"Prediction by {description}",
        )
    ]
