"""The ONNX model family and the shipped U-Net: held-out Dice, sliding window, geometry,
bad models refused at registration, and a SEG from ``dicom-node process`` that passes
dciodvfy."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import ClassVar

import numpy as np
import pydantic
import pydicom
import pytest

import processors.model as model_module
from dicom_node.synthetic import generate_series
from dicom_node.testing import require_tool
from processors import registry
from processors.api import run_processor
from processors.base import LabelResult, MeasurementResult, ProcessorError, Volume
from processors.model import (
    UNET_MANIFEST,
    InferenceOptions,
    ModelError,
    OnnxSegmentation,
    UNet,
    activate,
    axis_codes,
    cpu_session,
    load_segmentation_model,
    mirrored_logits,
    onnx_segmentation_processor,
    segment_volume,
    sliding_window,
)
from processors.models.unet_phantoms import held_out_case, make_ct_case

UNET_DIR = UNET_MANIFEST.parent
HELD_OUT_CASES = 20

#: A 1x1x1 convolution, logits = (-4x, 1, 4x - 1) per voxel (built with onnx.helper: Conv,
#: opset 17, input "image" (n, 1, z, y, x), output "logits" (n, 3, z, y, x)). Pointwise,
#: so sliding-window inference must equal whole-volume inference exactly, whatever the
#: tiling.
POINTWISE_ONNX = base64.b64decode(
    "CAgSEGRpY29tLW5vZGUgdGVzdHM6ygEKNAoFaW1hZ2UKAXcKAWISBmxvZ2l0cyIEQ29udioXCgxrZXJuZWxf"
    "c2hhcGVAAUABQAGgAQcSCXBvaW50d2lzZSodCAMIAQgBCAEIARABQgF3SgwAAIDAAAAAAAAAgEAqFQgDEAFC"
    "AWJKDAAAAAAAAIA/AACAv1onCgVpbWFnZRIeChwIARIYCgMSAW4KAggBCgMSAXoKAxIBeQoDEgF4YigKBmxv"
    "Z2l0cxIeChwIARIYCgMSAW4KAggDCgMSAXoKAxIBeQoDEgF4QgQKABAR"
)

#: The same graph with its weights and bias times -1: logits (4x, -1, 1 - 4x).
NEGATED_POINTWISE_ONNX = base64.b64decode(
    "CAgSEGRpY29tLW5vZGUgdGVzdHM6ygEKNAoFaW1hZ2UKAXcKAWISBmxvZ2l0cyIEQ29udioXCgxrZXJuZWxf"
    "c2hhcGVAAUABQAGgAQcSCXBvaW50d2lzZSodCAMIAQgBCAEIARABQgF3SgwAAIBAAAAAgAAAgMAqFQgDEAFC"
    "AWJKDAAAAIAAAIC/AACAP1onCgVpbWFnZRIeChwIARIYCgMSAW4KAggBCgMSAXoKAxIBeQoDEgF4YigKBmxv"
    "Z2l0cxIeChwIARIYCgMSAW4KAggDCgMSAXoKAxIBeQoDEgF4QgQKABAR"
)


def _pointwise_manifest(**overrides: object) -> dict[str, object]:
    document: dict[str, object] = {
        "format": "dicom-node-onnx-segmentation/1",
        "name": "pointwise",
        "version": "0.1.0",
        "model": "pointwise.onnx",
        "spatial_dims": 3,
        "input": {"name": "image", "channels": 1},
        "output": {"name": "logits", "activation": "softmax"},
        "spacing": [2.0, 2.0, 2.0],
        "orientation": "LPS",
        "normalization": {"type": "zscore", "mean": 0.0, "std": 1.0},
        "patch_size": [8, 16, 16],
        "overlap": 0.5,
        "labels": [
            {
                "label": 1,
                "name": "Low",
                "category": ["85756007", "SCT", "Tissue"],
                "type": ["87784001", "SCT", "Soft tissue"],
            },
            {
                "label": 2,
                "name": "High",
                "category": ["85756007", "SCT", "Tissue"],
                "type": ["272673000", "SCT", "Bone"],
            },
        ],
    }
    document.update(overrides)
    return document


def _write_model(folder: Path, manifest: dict[str, object], model: bytes = POINTWISE_ONNX) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(manifest["model"])).write_bytes(model)
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def unet():
    return load_segmentation_model(UNET_MANIFEST)


# --- Registration ---------------------------------------------------------------------


def test_unet_is_a_registered_available_model():
    info = registry.find("unet", registry.discover())
    assert info.available, info.reason
    assert info.builtin and info.family == "model" and info.version == "1.2.0"
    assert info.processor is UNet
    assert (UNET_DIR / "lung-lesion-unet.onnx").stat().st_size < 4 * 1024 * 1024
    manifest = json.loads(UNET_MANIFEST.read_text())
    assert manifest["version"] == UNet.version
    assert [item["type"][0] for item in manifest["labels"]] == ["39607008", "52988006"]


def test_runtime_never_imports_torch_or_onnx():
    code = (
        "import sys, numpy as np\n"
        "from processors.api import run_processor\n"
        "from processors.base import Volume\n"
        "run_processor('unet', Volume(np.full((8, 32, 32), -1000.0, np.float32), modality='CT'))\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _fake_entry_points(monkeypatch, extra: list[EntryPoint]) -> None:
    real = registry.entry_points(group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real, *extra])


class BrokenModel(OnnxSegmentation):
    name: ClassVar[str] = "broken_model"
    version: ClassVar[str] = "0.1.0"
    manifest_path: ClassVar[Path] = Path("/nonexistent/manifest.json")


def test_bad_model_is_refused_at_registration(tmp_path, monkeypatch):
    manifest = _write_model(tmp_path / "m", _pointwise_manifest())
    (tmp_path / "m" / "pointwise.onnx").write_bytes(b"\x08\x07 this is not a model")
    monkeypatch.setattr(BrokenModel, "manifest_path", manifest)
    _fake_entry_points(
        monkeypatch,
        [EntryPoint("broken_model", f"{__name__}:BrokenModel", registry.ENTRY_POINT_GROUP)],
    )
    info = registry.find("broken_model", registry.discover(autoload=True))
    assert not info.available
    assert "ONNX Runtime cannot load the model" in info.reason and "pointwise.onnx" in info.reason
    with pytest.raises(registry.ProcessorUnavailableError, match="cannot load"):
        registry.get_processor("broken_model", registry.discover(autoload=True))


def test_factory_checks_the_model_when_the_plugin_is_imported(tmp_path):
    good = _write_model(tmp_path / "good", _pointwise_manifest())
    cls = onnx_segmentation_processor("pointwise", good)
    assert cls.name == "pointwise" and cls.version == "0.1.0" and cls.family == "model"
    assert registry.check_processor_class(cls) is None
    assert cls.is_available() == (True, "")
    bad = _write_model(tmp_path / "bad", _pointwise_manifest(patch_size=[8, 16]))
    with pytest.raises(ModelError, match="patch_size must be 3 positive integers"):
        onnx_segmentation_processor("bad", bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": []}, "labels: .*at least 1"),
        ({"format": "something/2"}, "format"),
        ({"spacing": [2.0, -1.0, 2.0]}, "spacing values are positive"),
        ({"orientation": "LLS"}, "three different axes"),
        ({"normalization": {"type": "window", "lower": 100, "upper": 0}}, "above lower"),
        ({"normalization": {"type": "histogram"}}, "normalization"),
        ({"input": {"name": "input_0", "channels": 1}}, "no input 'input_0'"),
        ({"output": {"name": "probs"}}, "no output 'probs'"),
        ({"output": {"name": "logits", "activation": "sigmoid"}}, r"need \[1, 2, 8, 8, 8\]"),
        ({"model": "missing.onnx"}, "model file not found"),
        ({"sha256": "0" * 64}, "SHA-256"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"mirror_axes": [2, 2]}, "mirror_axes must be distinct axes"),
        ({"mirror_axes": [3]}, "mirror_axes must be distinct axes"),
    ],
)
def test_bad_manifest_gives_a_clear_error(tmp_path, change, message):
    folder = tmp_path / "m"
    _write_model(folder, _pointwise_manifest())
    (folder / "manifest.json").write_text(json.dumps(_pointwise_manifest(**change)))
    with pytest.raises(ModelError, match=message) as caught:
        load_segmentation_model(folder / "manifest.json")
    assert str(folder / "manifest.json") in str(caught.value) or "pointwise.onnx" in str(
        caught.value
    )


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]"])
def test_unreadable_manifest(tmp_path, content):
    path = _write_model(tmp_path, _pointwise_manifest())
    path.write_bytes(content)
    with pytest.raises(ModelError, match="manifest"):
        load_segmentation_model(path)


def test_truncated_model_file(tmp_path):
    path = _write_model(tmp_path, _pointwise_manifest(), POINTWISE_ONNX[: len(POINTWISE_ONNX) // 2])
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        load_segmentation_model(path)


def test_a_model_file_replaced_on_disk_is_loaded_and_checked_again(tmp_path):
    path = _write_model(tmp_path, _pointwise_manifest())
    model = load_segmentation_model(path)
    image = np.ones((1, 1, 8, 16, 16), np.float32)
    (before,) = cpu_session(model.model_path).run(["logits"], {"image": image})
    stamp = model.model_path.stat().st_mtime_ns
    model.model_path.write_bytes(NEGATED_POINTWISE_ONNX)  # same manifest, another network
    # A later file, as a replacement would be (the file system's clock may not have moved
    # between two writes this close together).
    os.utime(model.model_path, ns=(stamp + 10**9, stamp + 10**9))
    replaced = load_segmentation_model(path)
    (after,) = cpu_session(replaced.model_path).run(["logits"], {"image": image})
    np.testing.assert_allclose(after, -before)
    model.model_path.write_bytes(POINTWISE_ONNX[:100])  # broken now: refused, not cached
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        load_segmentation_model(path)


# --- Sliding window -------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_equals_whole_volume_for_a_pointwise_model(tmp_path, xp, blend):
    model = load_segmentation_model(_write_model(tmp_path, _pointwise_manifest()))
    rng = np.random.default_rng(1)
    image = rng.normal(size=(19, 37, 41)).astype(np.float32)
    options = InferenceOptions(overlap=0.3, batch_size=3, blend=blend)
    tiled = sliding_window(model, xp.asarray(image), xp, options)
    (logits,) = cpu_session(model.model_path).run(["logits"], {"image": image[None, None]})
    whole = activate(np, logits, "softmax")[0]
    np.testing.assert_allclose(_host(tiled), whole, rtol=1e-5, atol=1e-6)


def _host(array):
    get = getattr(array, "get", None)
    return get() if get is not None and not isinstance(array, np.ndarray) else np.asarray(array)


def test_sliding_window_equals_whole_volume_for_the_unet(unet):
    case = make_ct_case(5, (40, 120, 120), (2.5, 2.0, 2.0))
    image = ((np.clip(case.image, -1000, 400) + 1000) / 1400).astype(np.float32)
    session = cpu_session(unet.model_path)
    # One patch: identical.
    patch = np.ascontiguousarray(image[:32, :96, :96])
    (logits,) = session.run(["logits"], {"image": patch[None, None]})
    one = sliding_window(unet, patch, np)
    np.testing.assert_allclose(one, activate(np, logits, "softmax")[0], atol=1e-5)
    # Several overlapping patches: the same labels as one pass over the whole volume.
    crop = np.ascontiguousarray(image[:, :112, :112])
    (logits,) = session.run(["logits"], {"image": crop[None, None]})
    whole = activate(np, logits, "softmax")[0]
    tiled = sliding_window(unet, crop, np, InferenceOptions(overlap=0.5, batch_size=4))
    assert (tiled.argmax(0) == whole.argmax(0)).mean() > 0.999
    assert np.abs(tiled - whole).mean() < 2e-3


def test_mirroring_averages_the_flipped_predictions_flipped_back():
    """nnU-Net's test-time mirroring: a model that is not flip-equivariant (logits scale
    with the column index) gives, per voxel, the mean of its two readings."""
    batch = np.random.default_rng(3).normal(size=(2, 1, 4, 6, 8)).astype(np.float32)
    ramp = np.arange(8, dtype=np.float32)

    def runner(b):
        return np.concatenate([b * ramp, -b], axis=1)

    plain = runner(batch)
    flipped_back = runner(batch[..., ::-1])[..., ::-1]
    np.testing.assert_allclose(
        mirrored_logits(runner, batch, np, (2,)), (plain + flipped_back) / 2, rtol=1e-6
    )
    np.testing.assert_array_equal(mirrored_logits(runner, batch, np, ()), plain)
    # Two axes: the image and its three flips.
    both = mirrored_logits(runner, batch, np, (1, 2))
    readings = [runner(batch[..., ::-1, :])[..., ::-1, :], flipped_back, plain]
    readings.append(runner(batch[..., ::-1, ::-1])[..., ::-1, ::-1])
    np.testing.assert_allclose(both, sum(readings) / 4, rtol=1e-5, atol=1e-6)


def test_mirror_axes_of_the_manifest_are_used_unless_switched_off(tmp_path, monkeypatch):
    model = load_segmentation_model(_write_model(tmp_path, _pointwise_manifest(mirror_axes=[0, 2])))
    seen: list[tuple[int, ...]] = []
    real = model_module.mirrored_logits

    def spy(runner, batch, xp, axes):
        seen.append(tuple(axes))
        return real(runner, batch, xp, axes)

    monkeypatch.setattr(model_module, "mirrored_logits", spy)
    image = np.random.default_rng(4).normal(size=(8, 16, 16)).astype(np.float32)
    mirrored = sliding_window(model, image, np)
    plain = sliding_window(model, image, np, InferenceOptions(mirror=False))
    assert set(seen) == {(0, 2), ()}
    np.testing.assert_allclose(mirrored, plain, rtol=1e-5, atol=1e-6)  # pointwise: equivariant


def test_only_a_volume_smaller_than_the_patch_is_padded(tmp_path, monkeypatch):
    """Padding every axis up to the size multiple would put a wall of pad_value after the
    last slice, where the shipped U-Net (never trained beside one) called lesions."""
    model = load_segmentation_model(
        _write_model(tmp_path, _pointwise_manifest(size_multiple=8, pad_value=-7.0))
    )
    seen: list[np.ndarray] = []
    real = model_module.sliding_window

    def spy(model, image, xp, *options):
        seen.append(np.asarray(image))
        return real(model, image, xp, *options)

    monkeypatch.setattr(model_module, "sliding_window", spy)
    rng = np.random.default_rng(2)
    for shape, expected in (((19, 37, 41), (19, 37, 41)), ((5, 10, 41), (8, 16, 41))):
        image = rng.normal(size=shape).astype(np.float32)
        labels = segment_volume(model, Volume(image, spacing=(2.0, 2.0, 2.0)), np)
        assert labels.shape == shape
        padded = seen.pop()
        assert padded.shape == expected
        np.testing.assert_array_equal(padded[: shape[0], : shape[1], : shape[2]], image)
        assert np.all(padded[shape[0] :] == -7.0) and np.all(padded[:, shape[1] :] == -7.0)


def test_label_map_is_on_the_source_grid(unet):
    case = held_out_case(0)
    volume = Volume(
        case.image,
        spacing=case.spacing,
        origin=(-120.0, -80.0, 35.5),
        modality="CT",
        series_instance_uid="1.2.3",
    )
    results = run_processor("unet", volume)
    label = next(r for r in results if isinstance(r, LabelResult))
    assert label.labels.shape == volume.shape and label.labels.dtype == np.uint8
    assert label.geometry.spacing == volume.spacing and label.geometry.origin == volume.origin
    assert label.geometry.series_instance_uid == "1.2.3"
    assert [s.type.value for s in label.segments] == ["39607008", "52988006"][: len(label.segments)]
    (stats,) = [r for r in results if isinstance(r, MeasurementResult)]
    lung_ml = stats.value("Volume", segment=1) / 1000
    assert lung_ml == pytest.approx((label.labels == 1).sum() * volume.voxel_volume_mm3 / 1000)


def test_orientation_is_undone(unet):
    case = make_ct_case(11, (24, 80, 96), (2.5, 2.0, 2.0))
    axial = Volume(case.image, spacing=case.spacing, modality="CT")
    reference = segment_volume(unet, axial, np)
    # Rows running anterior and slices running inferior: the same voxels, flipped.
    flipped = Volume(
        np.ascontiguousarray(case.image[::-1, ::-1, :]),
        spacing=case.spacing,
        orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        modality="CT",
    )
    assert axis_codes(flipped.orientation) == ("I", "A", "L")
    np.testing.assert_array_equal(segment_volume(unet, flipped, np), reference[::-1, ::-1, :])
    # Coronal: slices along posterior, rows running inferior.
    coronal_image = np.ascontiguousarray(np.transpose(case.image, (1, 0, 2))[:, ::-1, :])
    coronal = Volume(
        coronal_image,
        spacing=(case.spacing[1], case.spacing[0], case.spacing[2]),
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        modality="CT",
    )
    expected = np.transpose(reference, (1, 0, 2))[:, ::-1, :]
    np.testing.assert_array_equal(segment_volume(unet, coronal, np), expected)


# --- The shipped model's quality --------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_dice(unet) -> dict[int, float]:
    """Pooled Dice per label of the processor on the held-out phantoms (seeds never used
    in training), measured now."""
    inter = {1: 0, 2: 0}
    total = {1: 0, 2: 0}
    for index in range(HELD_OUT_CASES):
        case = held_out_case(index)
        (label, _) = run_processor("unet", Volume(case.image, spacing=case.spacing, modality="CT"))
        assert isinstance(label, LabelResult)
        for value in (1, 2):
            predicted, truth = label.labels == value, case.labels == value
            inter[value] += int(np.logical_and(predicted, truth).sum())
            total[value] += int(predicted.sum() + truth.sum())
    return {value: 2 * inter[value] / total[value] for value in (1, 2)}


@pytest.mark.slow
def test_held_out_dice_is_the_model_cards(held_out_dice):
    card = json.loads((UNET_DIR / "training.json").read_text())["evaluation"]
    assert card["cases"] == HELD_OUT_CASES
    text = (UNET_DIR / "MODEL_CARD.md").read_text()
    for value in (1, 2):
        assert held_out_dice[value] == pytest.approx(card["pooled_dice"][str(value)], abs=0.002)
        assert f"{card['pooled_dice'][str(value)]:.3f}" in text
    for value, name in ((1, "lung"), (2, "lesion")):
        assert held_out_dice[value] >= 0.9, f"{name}: Dice {held_out_dice[value]:.3f}"


# --- Parameters and refusals --------------------------------------------------------------


def test_params_are_validated():
    with pytest.raises(pydantic.ValidationError, match="overlap"):
        UNet.Params(overlap=0.95)
    with pytest.raises(pydantic.ValidationError, match="batch_size"):
        UNet.Params(batch_size=0)


def test_refuses_other_modalities():
    volume = Volume(np.zeros((8, 32, 32), np.float32), modality="MR")
    with pytest.raises(ProcessorError, match="for CT images, not MR"):
        UNet().run(volume, UNet.Params(), np)


def test_empty_result_has_no_segments():
    (label,) = run_processor(
        "unet", Volume(np.full((8, 40, 40), -1000.0, np.float32), modality="CT")
    )
    assert isinstance(label, LabelResult) and label.segments == ()


# --- End to end: dicom-node process -> SEG -> dciodvfy ------------------------------------


@pytest.mark.slow
def test_process_writes_a_unet_seg_that_passes_dciodvfy(tmp_path):
    from dicom_node.process import build_steps, process_directory

    tool = require_tool("dciodvfy")  # missing: fails with the install command (make deps)
    series = generate_series(
        num_slices=16, rows=160, columns=160, pixel_spacing=1.6, slice_thickness=2.5, uid_seed="u"
    )
    series.write(tmp_path / "in")
    report = process_directory(tmp_path / "in", tmp_path / "out", build_steps(["unet"]))
    segs = [o for o in report.outputs if o.kind == "seg"]
    assert len(segs) == 1 and segs[0].processor_name == "unet"
    ds = pydicom.dcmread(segs[0].path)
    assert ds.Modality == "SEG"
    names = [item.SegmentLabel for item in ds.SegmentSequence]
    assert "Lung" in names
    assert ds.SegmentSequence[0].SegmentAlgorithmName == "unet"
    result = subprocess.run([tool, str(segs[0].path)], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert errors == []
    srs = [o for o in report.outputs if o.kind == "sr"]
    assert len(srs) == 1
    result = subprocess.run([tool, str(srs[0].path)], capture_output=True, text=True)
    assert [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line] == []
