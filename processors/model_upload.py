"""Checks on a model an admin uploads, before it is registered: each problem names the
field at fault (``UploadRefusedError.field``), so the API answers 422 with it.

An ONNX segmentation network with its manifest: the manifest's schema
(``manifest.<field>``), then the network against the manifest in an ONNX Runtime session
(``file`` when it is no ONNX model; ``inputs[0]`` / ``outputs[0]`` for names, ranks and
types), then a test inference on a small volume through the processor's own code
(reorientation, resampling, sliding window), whose output must have one channel per
label. A scikit-learn ``.skops`` file: its types against the allow-list of
``processors.predict``, its document, then a test prediction on a small phantom.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from processors.base import ProcessorError, Volume
from processors.errors import BadInputError
from processors.model import InferenceOptions, SegmentationModel, cpu_session, segment_volume
from processors.model_manifest import Manifest, ModelError
from processors.model_plugin import MODEL_NAME_PATTERN
from processors.predict import LoadedModel, load_model, predict_values

UPLOADED_MODEL_PLACEHOLDER = "uploaded.onnx"
"""The manifest's ``model`` field may be left out of an upload: the registry sets it."""


class UploadRefusedError(BadInputError):
    """An uploaded model or manifest is refused; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_manifest(text: str | bytes) -> Manifest:
    """The uploaded manifest, validated by the schema of ``processors.model_manifest``."""
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UploadRefusedError("manifest", f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise UploadRefusedError("manifest", "a manifest is a JSON object")
    document.setdefault("model", UPLOADED_MODEL_PLACEHOLDER)
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        field = f"manifest.{where}" if where else "manifest"
        raise UploadRefusedError(field, error["msg"].removeprefix("Value error, ")) from None
    check_model_name(manifest.name, "manifest.name")
    if len(manifest.version) > 64:
        raise UploadRefusedError("manifest.version", "at most 64 characters")
    return manifest


def check_model_name(name: str, field: str) -> None:
    if not MODEL_NAME_PATTERN.match(name):
        raise UploadRefusedError(
            field,
            f"{name!r} is not a model name: lower-case letters, digits, '.', '_', '-', "
            "at most 64, starting with a letter or digit",
        )


def check_onnx(model_path: Path, manifest: Manifest, sha256: str) -> None:
    """The network at ``model_path`` matches ``manifest`` and runs on a small volume."""
    if manifest.sha256 is not None and manifest.sha256 != sha256:
        raise UploadRefusedError("manifest.sha256", f"differs from the file's SHA-256 {sha256}")
    try:
        session = cpu_session(model_path)
    except ModelError:
        raise UploadRefusedError("file", "not an ONNX model ONNX Runtime can load") from None
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    _check_names("inputs", [i.name for i in inputs], manifest.input.name, "manifest.input.name")
    _check_names("outputs", [o.name for o in outputs], manifest.output.name, "manifest.output.name")
    index = [i.name for i in inputs].index(manifest.input.name)
    node = inputs[index]
    rank = manifest.spatial_dims + 2
    shape = list(node.shape)
    if len(shape) != rank:
        axes = "(batch, channel, z, y, x)" if rank == 5 else "(batch, channel, y, x)"
        raise UploadRefusedError(
            f"inputs[{index}].shape",
            f"{shape} has rank {len(shape)}; the manifest's spatial_dims "
            f"{manifest.spatial_dims} needs rank {rank} {axes}",
        )
    if isinstance(shape[1], int) and shape[1] != manifest.input.channels:
        raise UploadRefusedError(
            f"inputs[{index}].shape",
            f"{shape} has {shape[1]} channels; the manifest's input takes "
            f"{manifest.input.channels}",
        )
    if node.type != "tensor(float)":
        field = f"inputs[{index}].type"
        raise UploadRefusedError(field, f"{node.type}; the node feeds tensor(float)")
    output_index = [o.name for o in outputs].index(manifest.output.name)
    output_type = outputs[output_index].type
    if output_type != "tensor(float)":
        raise UploadRefusedError(
            f"outputs[{output_index}].type", f"{output_type}; the node reads tensor(float)"
        )
    test_inference(SegmentationModel(manifest, model_path, model_path))


def _check_names(kind: str, names: list[str], wanted: str, field: str) -> None:
    if wanted not in names:
        raise UploadRefusedError(field, f"{wanted!r} is not among the network's {kind} {names}")


def test_volume(manifest: Manifest) -> Volume:
    """A small CT-like volume on the model's grid: 8 slices (a 2-D model: 2) of a patch's
    in-plane size at most 32 voxels, air with a soft-tissue block."""
    spacing = tuple(1.0 if s is None else float(s) for s in manifest.spacing)
    patch = manifest.patch3d
    multiple = manifest.size_multiple
    slices = 2 if manifest.spatial_dims == 2 else min(patch[0], multiple * math.ceil(8 / multiple))
    side = [min(p, multiple * math.ceil(32 / multiple)) for p in patch[1:]]
    array = np.full((slices, side[0], side[1]), -1000.0, dtype=np.float32)
    array[:, side[0] // 4 : 3 * side[0] // 4, side[1] // 4 : 3 * side[1] // 4] = 40.0
    modality = manifest.modality[0] if manifest.modality else "CT"
    return Volume(array, spacing=(spacing[0], spacing[1], spacing[2]), modality=modality)


def test_inference(model: SegmentationModel) -> None:
    """Run the model over a small volume as a job would (no mirroring: one pass)."""
    volume = test_volume(model.manifest)
    options = InferenceOptions(mirror=False)
    try:
        labels = segment_volume(model, volume, np, options)
    except ProcessorError as exc:
        raise UploadRefusedError("file", f"the test inference fails: {exc}") from None
    except Exception as exc:  # ONNX Runtime raises its own types, and shape errors
        raise UploadRefusedError(
            "outputs",
            f"the test inference on a {list(volume.array.shape)} volume fails: "
            f"{type(exc).__name__}: {_first_line(exc)}",
        ) from None
    if labels.shape != volume.array.shape:
        shape = list(volume.array.shape)
        raise UploadRefusedError("outputs", f"a label map of {list(labels.shape)} for {shape}")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def check_skops(path: Path) -> LoadedModel:
    """A ``.skops`` document that loads under the allow-list and predicts on a phantom."""
    try:
        model = load_model(path)
    except ProcessorError as exc:
        message = str(exc).removeprefix(f"{path.name}: ")
        raise UploadRefusedError("file", message) from None
    except Exception:  # skops cannot even list the types: no .skops file at all
        raise UploadRefusedError(
            "file", "not a .skops model (an ONNX network comes with its 'manifest')"
        ) from None
    check_model_name(model.name, "file.name")
    volume = _phantom()
    try:
        output: Any = predict_values(model, volume, np)
    except Exception as exc:  # a pipeline fitted on other features raises sklearn's errors
        raise UploadRefusedError(
            "file", f"the test prediction fails: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if model.task == "classification" and len(np.atleast_1d(output)) != len(
        model.pipeline.classes_
    ):
        raise UploadRefusedError("file", "predict_proba gives no probability per class")
    return model


def _phantom() -> Volume:
    """A 16x48x48 CT-like block: air around a soft-tissue box with a denser sphere."""
    z, y, x = np.mgrid[0:16, 0:48, 0:48]
    array = np.full((16, 48, 48), -1000.0, dtype=np.float32)
    array[:, 8:40, 8:40] = 40.0
    array[(z - 8) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 < 16] = 90.0
    return Volume(array, spacing=(2.5, 3.0, 3.0), modality="CT")
