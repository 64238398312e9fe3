"""Registered models as processors: built from a ``ModelRef`` alone (what a Dask worker
gets), named ``model:<name>``, refused with the reason when not enabled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest

from processors.api import run_processor
from processors.model import UNET_MANIFEST, ModelParams
from processors.model_plugin import ModelRef, model_plugin_info, with_registered_models
from processors.registry import ProcessorUnavailableError, get_processor

VOLUME_MODEL = Path(UNET_MANIFEST).parents[1] / "demo-lesion-volume.skops"


def test_an_onnx_ref_is_a_model_family_processor_with_the_unet_parameters() -> None:
    ref = ModelRef("lungs", "1.2.0", "segmentation", str(UNET_MANIFEST))
    info = model_plugin_info(ref)
    assert (info.name, info.version, info.family) == ("model:lungs", "1.2.0", "model")
    processor = get_processor("model:lungs", [info])
    assert processor.Params is ModelParams
    assert processor.model().manifest.name == "lung-lesion-unet"  # type: ignore[attr-defined]


def test_a_skops_ref_predicts_as_the_predict_processor_does() -> None:
    ref = ModelRef("volume", "1.0.0", "regression", str(VOLUME_MODEL))
    plugins = with_registered_models([], {ref.step: ref})
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 10.0, (12, 32, 32)).astype(np.float32)
    [registered] = run_processor("model:volume", image, (2.5, 3.0, 3.0), plugins=plugins)
    [shipped] = run_processor("predict", image, (2.5, 3.0, 3.0), model=str(VOLUME_MODEL))
    assert registered.measurements == shipped.measurements  # type: ignore[union-attr]
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):  # its file is fixed
        run_processor("model:volume", image, plugins=plugins, model="other")


def test_a_ref_not_enabled_is_refused_as_disabled() -> None:
    ref = ModelRef("lungs", "1.2.0", "segmentation", str(UNET_MANIFEST), enabled=False)
    with pytest.raises(ProcessorUnavailableError, match="'model:lungs' is disabled"):
        get_processor("model:lungs", [model_plugin_info(ref)])
