"""The script API, the backend selection and the result types."""

from __future__ import annotations

import numpy as np
import pytest

from processors import backend
from processors.api import run_pipeline, run_processor
from processors.base import (
    Classification,
    Codes,
    ImageResult,
    LabelResult,
    ProcessorError,
    SegmentDescription,
    Volume,
)
from processors.registry import UnknownProcessorError


def test_run_processor_keeps_geometry_and_stamps_provenance():
    volume = Volume(
        np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32),
        spacing=(3.0, 0.5, 0.5),
        origin=(1.0, 2.0, 3.0),
        modality="CT",
        sop_instance_uids=("1.1", "1.2", "1.3", "1.4"),
    )
    (result,) = run_processor("gaussian", volume, sigma_mm=1.0)
    assert isinstance(result, ImageResult)
    assert result.processor == "gaussian" and result.processor_version == "1.0.0"
    assert result.volume.spacing == (3.0, 0.5, 0.5)
    assert result.volume.origin == (1.0, 2.0, 3.0)
    assert result.volume.sop_instance_uids == volume.sop_instance_uids
    assert isinstance(result.volume.array, np.ndarray)


def test_unknown_processor():
    with pytest.raises(UnknownProcessorError, match="no processor named 'sharpen'"):
        run_processor("sharpen", np.zeros((2, 2, 2)))


def test_volume_validation():
    with pytest.raises(ProcessorError, match="3-D"):
        Volume(np.zeros((2, 2)))
    with pytest.raises(ProcessorError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ProcessorError, match="source UIDs"):
        Volume(np.zeros((2, 2, 2)), sop_instance_uids=("1",))
    with pytest.raises(ProcessorError, match="differs"):
        Volume(np.zeros((2, 2, 2))).with_array(np.zeros((2, 2, 3)))


def test_result_validation():
    geometry = Volume(np.zeros((2, 2, 2)))
    segment = SegmentDescription(1, "body", Codes.ANATOMICAL_STRUCTURE, Codes.ENTIRE_BODY)
    with pytest.raises(ProcessorError, match="shape"):
        LabelResult(np.zeros((2, 2, 3), np.uint8), (segment,), geometry)
    with pytest.raises(ProcessorError, match="repeat"):
        LabelResult(np.zeros((2, 2, 2), np.uint8), (segment, segment), geometry)
    with pytest.raises(ProcessorError, match="start at 1"):
        SegmentDescription(0, "x", Codes.TISSUE, Codes.TISSUE)
    with pytest.raises(ProcessorError, match="probability"):
        Classification(Codes.FINDING, "lesion", 1.5)


@pytest.mark.parametrize(
    ("device", "kind", "index"),
    [("cpu", "cpu", 0), ("auto", "auto", 0), ("cuda", "cuda", 0), ("CUDA:3", "cuda", 3)],
)
def test_parse_device(device, kind, index):
    assert backend.parse_device(device) == (kind, index)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0", ""])
def test_parse_device_rejects(device):
    with pytest.raises(backend.BackendError, match="auto, cpu or cuda"):
        backend.parse_device(device)


def test_auto_falls_back_to_numpy_and_cuda_fails_clearly_without_cupy(monkeypatch):
    monkeypatch.setattr(backend, "cupy_status", lambda: (False, "CuPy is not importable: x"))
    chosen = backend.resolve("auto")
    assert chosen.xp is np and chosen.device == "cpu" and not chosen.is_gpu
    assert chosen.ndimage.__name__ == "scipy.ndimage"
    with pytest.raises(backend.BackendError, match="CuPy is not importable"):
        backend.resolve("cuda:0")
    with pytest.raises(backend.BackendError, match="CuPy is not importable"):
        run_processor("mean", np.zeros((2, 2, 2)), device="cuda:0")


def test_host_helpers():
    a = np.arange(3)
    assert backend.to_host(a) is a
    assert backend.array_module(a) is np
    assert backend.ndimage_for(np).__name__ == "scipy.ndimage"
    assert backend.to_float(np.float32(2.5)) == 2.5


def test_pipeline_feeds_images_forward():
    image = np.zeros((6, 10, 10), np.float32)
    image[2:4, 3:7, 3:7] = 100.0
    results = run_pipeline(
        [
            ("gaussian", {"sigma_mm": 0.5}),
            ("threshold_segment", {"preset": "custom", "lower": 50.0}),
        ],
        Volume(image),
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["ImageResult", "LabelResult", "MeasurementResult"]
    labels = results[1].labels
    assert labels[2:4, 4:6, 4:6].all() and not labels[0].any()
