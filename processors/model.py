"""Segmentation networks from ONNX files: the ``model`` family, and the shipped ``unet``.

A model is an ONNX file plus a ``manifest.json`` next to it (format
``dicom-node-onnx-segmentation/1``) that says how to feed it: the grid it was trained on
(spacing, orientation), the intensity normalisation (HU window or z-score), the sliding
window (patch size, overlap), and the output labels with their coded category and type
(SNOMED CT). ``run`` does, on the array namespace ``xp`` it is given:

1. reorient the volume to the model's axes (transposes and flips only),
2. resample it linearly to the model's spacing,
3. normalise the intensities and pad to at least one patch,
4. sliding-window inference with Gaussian-weighted blending of the overlapping patches
   (nnU-Net's importance map, sigma = patch / 8),
5. resample the class probabilities linearly back to the source grid, take the argmax,
   undo the reorientation, and return a ``LabelResult`` (one segment per label found)
   and a ``MeasurementResult`` (volume and intensity statistics per segment).

Inference runs with ONNX Runtime: the CPU execution provider for NumPy arrays; for CuPy
arrays the CUDA execution provider with I/O binding on the CuPy buffers (no host copies).
Where ONNX Runtime has no CUDA provider (the ``onnxruntime`` wheel is CPU-only;
``onnxruntime-gpu`` has it), each batch of patches is copied to the host and back: the
one host copy in this module. ONNX Runtime is imported lazily; PyTorch and onnx never.

A model is checked when it is registered: the manifest is validated field by field, the
ONNX file must load, have the declared input and output, and a small trial run must give
one channel per label (plus background for softmax) on the input's grid. A bad model or
manifest is listed by ``plugins list`` as unavailable with the reason (subclass with
``manifest_path``), or refuses to import (``onnx_segmentation_processor``), never fails
a job later. See ``docs/models.md`` for bringing a MONAI or nnU-Net model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from processors.backend import is_cupy, to_host
from processors.base import (
    Code,
    LabelResult,
    MeasurementResult,
    ProcessorError,
    ProcessorParams,
    Result,
    SegmentDescription,
    Volume,
)
from processors.segment import intensity_unit, segment_statistics

Array = Any

MANIFEST_FORMAT = "dicom-node-onnx-segmentation/1"
MODELS_DIR = Path(__file__).parent / "models"
UNET_MANIFEST = MODELS_DIR / "unet" / "manifest.json"

_AXIS_LETTERS = {("x", 1): "L", ("x", -1): "R", ("y", 1): "P", ("y", -1): "A"}
_AXIS_LETTERS |= {("z", 1): "S", ("z", -1): "I"}
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}


class ModelError(ProcessorError):
    """A model file or its manifest is unusable; the message names the file and why."""


# --- The manifest ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WindowNormalization(_Strict):
    """Clip to [lower, upper] (HU) and scale linearly to [out_min, out_max] (MONAI's
    ``ScaleIntensityRanged`` with ``clip=True``)."""

    type: Literal["window"]
    lower: float
    upper: float
    out_min: float = 0.0
    out_max: float = 1.0

    @field_validator("upper")
    @classmethod
    def _above_lower(cls, value: float, info: Any) -> float:
        if value <= info.data.get("lower", -math.inf):
            raise ValueError("upper must be above lower")
        return value


class ZScoreNormalization(_Strict):
    """``(clip(x, clip_lower, clip_upper) - mean) / std`` with fixed statistics (nnU-Net's
    CT normalisation: percentiles 0.5 / 99.5 and the foreground mean and std of the
    training set, from its ``plans.json``)."""

    type: Literal["zscore"]
    mean: float
    std: float = Field(gt=0)
    clip_lower: float | None = None
    clip_upper: float | None = None


class VolumeZScoreNormalization(_Strict):
    """``(x - mean(x)) / std(x)`` over the whole volume (nnU-Net's default for MR)."""

    type: Literal["volume_zscore"]


Normalization = WindowNormalization | ZScoreNormalization | VolumeZScoreNormalization


class ManifestLabel(_Strict):
    label: int = Field(ge=1, le=65535)
    name: str = Field(min_length=1, max_length=64)
    category: tuple[str, str, str]
    type: tuple[str, str, str]


class ManifestInput(_Strict):
    name: str = Field(min_length=1)
    channels: Literal[1] = 1


class ManifestOutput(_Strict):
    name: str = Field(min_length=1)
    activation: Literal["softmax", "sigmoid"] = "softmax"


class Manifest(_Strict):
    """The ``manifest.json`` of an ONNX segmentation model (see docs/models.md)."""

    format: Literal["dicom-node-onnx-segmentation/1"]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    model: str = Field(min_length=1, description="the ONNX file, relative to the manifest")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    modality: tuple[str, ...] = ()
    spatial_dims: Literal[2, 3] = 3
    input: ManifestInput
    output: ManifestOutput
    spacing: tuple[float | None, float | None, float | None]
    orientation: str = Field(default="LPS", pattern=r"^[LRAPSI]{3}$")
    normalization: Normalization = Field(discriminator="type")
    pad_value: float = 0.0
    patch_size: tuple[int, ...]
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    size_multiple: int = Field(default=1, ge=1, le=256)
    labels: tuple[ManifestLabel, ...] = Field(min_length=1)

    @field_validator("spacing")
    @classmethod
    def _positive(
        cls, value: tuple[float | None, float | None, float | None]
    ) -> tuple[float | None, float | None, float | None]:
        if any(s is not None and not (math.isfinite(s) and s > 0) for s in value):
            raise ValueError("spacing values are positive millimetres (or null: keep)")
        return value

    @field_validator("orientation")
    @classmethod
    def _three_axes(cls, value: str) -> str:
        if len({_axis_of(letter) for letter in value}) != 3:
            raise ValueError(f"orientation {value!r} must name three different axes")
        return value

    @field_validator("labels")
    @classmethod
    def _unique(cls, value: tuple[ManifestLabel, ...]) -> tuple[ManifestLabel, ...]:
        numbers = [item.label for item in value]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"labels must be numbered 1..{len(numbers)} in order, not {numbers}")
        return value

    @model_validator(mode="after")
    def _patch(self) -> Manifest:
        if len(self.patch_size) != self.spatial_dims or any(p < 1 for p in self.patch_size):
            raise ValueError(
                f"patch_size must be {self.spatial_dims} positive integers for a "
                f"{self.spatial_dims}-D model, not {list(self.patch_size)}"
            )
        if any(p % self.size_multiple for p in self.patch_size):
            raise ValueError(f"patch_size must be multiples of size_multiple {self.size_multiple}")
        return self

    @property
    def patch3d(self) -> tuple[int, int, int]:
        if self.spatial_dims == 2:
            return (1, self.patch_size[0], self.patch_size[1])
        return (self.patch_size[0], self.patch_size[1], self.patch_size[2])

    @property
    def channels_out(self) -> int:
        return len(self.labels) + (1 if self.output.activation == "softmax" else 0)


def _axis_of(letter: str) -> str:
    return {"L": "x", "R": "x", "P": "y", "A": "y", "S": "z", "I": "z"}[letter]


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest; any problem raises ``ModelError`` naming the file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"model manifest not found: {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON manifest: {exc}") from exc
    if not isinstance(document, dict):
        raise ModelError(f"{path}: a manifest is a JSON object")
    try:
        return Manifest.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'manifest'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ModelError(f"{path}: invalid manifest: {problems}") from exc


# --- Loading and checking the model ---------------------------------------------------


@dataclass(frozen=True)
class SegmentationModel:
    """A validated manifest and the path of its ONNX file (sessions are made lazily)."""

    manifest: Manifest
    manifest_path: Path
    model_path: Path

    @property
    def segments(self) -> tuple[SegmentDescription, ...]:
        return tuple(
            SegmentDescription(item.label, item.name, Code(*item.category), Code(*item.type))
            for item in self.manifest.labels
        )


def _onnxruntime() -> Any:
    return importlib.import_module("onnxruntime")


def load_segmentation_model(manifest_path: Path | str) -> SegmentationModel:
    """Read, validate and trial-run a model (cached per file version)."""
    path = Path(manifest_path).resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelError(f"model manifest not found: {path}") from exc
    return _load(path, stat.st_mtime_ns, stat.st_size)


@cache
def _load(path: Path, mtime_ns: int, size: int) -> SegmentationModel:
    manifest = read_manifest(path)
    model_path = (path.parent / manifest.model).resolve()
    if not model_path.is_file():
        raise ModelError(f"{path}: model file not found: {model_path}")
    if manifest.sha256 is not None:
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
        if digest != manifest.sha256:
            raise ModelError(f"{model_path}: SHA-256 {digest} differs from the manifest's")
    model = SegmentationModel(manifest, path, model_path)
    session = cpu_session(model_path)
    check_session(model, session)
    return model


@cache
def cpu_session(model_path: Path) -> Any:
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc


@cache
def cuda_session(model_path: Path, device_id: int) -> Any | None:
    """A session on the CUDA execution provider, or ``None`` where ONNX Runtime has none."""
    ort = _onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(model_path),
            sess_options=options,
            providers=[("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"],
        )
    except Exception as exc:
        raise ModelError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc
    if "CUDAExecutionProvider" not in session.get_providers():
        return None
    return session


def check_session(model: SegmentationModel, session: Any) -> None:
    """The ONNX graph has the manifest's input and output and answers a trial patch."""
    manifest = model.manifest
    where = str(model.model_path)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if manifest.input.name not in inputs:
        raise ModelError(
            f"{where}: no input {manifest.input.name!r} (the model has {sorted(inputs)})"
        )
    if manifest.output.name not in outputs:
        raise ModelError(
            f"{where}: no output {manifest.output.name!r} (the model has {sorted(outputs)})"
        )
    rank = manifest.spatial_dims + 2
    shape = inputs[manifest.input.name].shape
    if len(shape) != rank:
        raise ModelError(
            f"{where}: input {manifest.input.name!r} has rank {len(shape)}, a "
            f"{manifest.spatial_dims}-D model takes (batch, channel, "
            f"{'z, ' if rank == 5 else ''}y, x)"
        )
    if "float" not in str(inputs[manifest.input.name].type):
        raise ModelError(f"{where}: input type {inputs[manifest.input.name].type}, not float")
    # A trial run on the smallest patch the model takes: catches graphs that do not run,
    # and gives the real output channel count and spatial shape.
    trial = tuple(
        static if isinstance(static, int) and static > 0 else m
        for static, m in zip(shape[2:], _trial_shape(manifest), strict=True)
    )
    x = np.zeros((1, manifest.input.channels, *trial), dtype=np.float32)
    try:
        (y,) = session.run([manifest.output.name], {manifest.input.name: x})
    except Exception as exc:
        raise ModelError(f"{where}: a trial run on a {list(trial)} patch fails: {exc}") from exc
    expected = (1, manifest.channels_out, *trial)
    if tuple(y.shape) != expected:
        raise ModelError(
            f"{where}: output {manifest.output.name!r} has shape {list(y.shape)} for a "
            f"{list(trial)} patch, the manifest's {len(manifest.labels)} label(s) with "
            f"{manifest.output.activation} need {list(expected)}"
        )


def _trial_shape(manifest: Manifest) -> tuple[int, ...]:
    m = manifest.size_multiple
    return tuple(min(p, m * math.ceil(8 / m)) for p in manifest.patch_size)


# --- Geometry: orientation and resampling -----------------------------------------------


def axis_codes(orientation: tuple[float, ...]) -> tuple[str, str, str]:
    """Patient directions (LPS letters) of increasing (slice, row, column) index."""
    row = np.asarray(orientation[:3], dtype=np.float64)  # along a row: column index grows
    col = np.asarray(orientation[3:], dtype=np.float64)  # down a column: row index grows
    normal = np.cross(row, col)
    letters = []
    for vector in (normal, col, row):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXIS_LETTERS[("xyz"[axis], 1 if vector[axis] > 0 else -1)])
    if len({_axis_of(letter) for letter in letters}) != 3:
        raise ProcessorError(f"cannot tell the axes of orientation {orientation}")
    return (letters[0], letters[1], letters[2])


def reorientation(
    source: tuple[str, str, str], target: str
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(permutation, flips) taking a (slice, row, column) array with ``source`` codes to
    one whose axes are ``target`` read as (column, row, slice) letters, e.g. "LPS"."""
    wanted = (target[2], target[1], target[0])
    perm: list[int] = []
    flips: list[bool] = []
    for letter in wanted:
        for index, code in enumerate(source):
            if code == letter or code == _OPPOSITE[letter]:
                perm.append(index)
                flips.append(code != letter)
                break
    return (perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2])


def apply_reorientation(
    xp: ModuleType, array: Array, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> Array:
    out = xp.transpose(array, perm)
    for axis, flip in enumerate(flips):
        if flip:
            out = xp.flip(out, axis=axis)
    return out


def undo_reorientation(
    xp: ModuleType, array: Array, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
) -> Array:
    for axis, flip in enumerate(flips):
        if flip:
            array = xp.flip(array, axis=axis)
    inverse = tuple(int(i) for i in np.argsort(perm))
    return xp.transpose(array, inverse)


def target_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """The grid size that covers the same extent at ``target`` spacing."""
    z, y, x = (max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))
    return (z, y, x)


def resample_linear(xp: ModuleType, array: Array, shape: tuple[int, int, int]) -> Array:
    """Resample ``array`` linearly onto ``shape`` voxels covering the same extent.

    Voxel centres map as ``(i + 0.5) * n_in / n_out - 0.5`` (the grids share their outer
    edges) and positions beyond the outer voxel centres take the edge value: the same
    numbers as ``ndimage.affine_transform(order=1, mode="nearest")`` with that diagonal
    matrix, computed one axis at a time (two gathers and a multiply-add per axis), which
    is several times faster than the general transform on large outputs.
    """
    out = xp.asarray(array, dtype=xp.float32)
    if tuple(out.shape) == tuple(shape):
        return out
    # Shrinking axes first keeps the intermediate arrays small.
    order = sorted(range(3), key=lambda axis: shape[axis] / out.shape[axis])
    for axis in order:
        n_in, n_out = int(out.shape[axis]), int(shape[axis])
        if n_in == n_out:
            continue
        coords = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1.0)
        lower = np.floor(coords).astype(np.int64)
        upper = np.minimum(lower + 1, n_in - 1)
        view = [1, 1, 1]
        view[axis] = n_out
        weight = xp.asarray((coords - lower).astype(np.float32)).reshape(view)
        low = xp.take(out, xp.asarray(lower), axis=axis)
        high = xp.take(out, xp.asarray(upper), axis=axis)
        high -= low
        high *= weight
        low += high
        out = low
    return out


# --- Inference --------------------------------------------------------------------------


def normalize(xp: ModuleType, image: Array, norm: Normalization) -> Array:
    image = image.astype(xp.float32, copy=False)
    if isinstance(norm, WindowNormalization):
        scale = (norm.out_max - norm.out_min) / (norm.upper - norm.lower)
        return (xp.clip(image, norm.lower, norm.upper) - norm.lower) * xp.float32(
            scale
        ) + xp.float32(norm.out_min)
    if isinstance(norm, ZScoreNormalization):
        if norm.clip_lower is not None or norm.clip_upper is not None:
            image = xp.clip(image, norm.clip_lower, norm.clip_upper)
        return (image - xp.float32(norm.mean)) / xp.float32(norm.std)
    mean = float(image.mean())
    std = float(image.std())
    return (image - xp.float32(mean)) / xp.float32(max(std, 1e-8))


def gaussian_importance(
    xp: ModuleType, patch: tuple[int, int, int], sigma_scale: float = 0.125
) -> Array:
    """nnU-Net's importance map: a Gaussian with sigma = patch / 8, peak 1, no zeros."""
    weights = xp.ones(patch, dtype=xp.float32)
    for axis, n in enumerate(patch):
        if n == 1:
            continue
        sigma = n * sigma_scale
        coords = xp.arange(n, dtype=xp.float32) - (n - 1) / 2
        profile = xp.exp(-0.5 * (coords / sigma) ** 2)
        shape = [1, 1, 1]
        shape[axis] = n
        weights = weights * profile.reshape(shape)
    weights = weights / weights.max()
    smallest = float(weights[weights > 0].min())
    return xp.maximum(weights, xp.float32(smallest))


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Patch start positions covering ``size`` with at least ``overlap`` between patches."""
    if size <= patch:
        return [0]
    step = max(patch * (1.0 - overlap), 1.0)
    count = math.ceil((size - patch) / step) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


class _Runner:
    """Runs batches of patches through ONNX Runtime on the device of ``xp``."""

    def __init__(self, model: SegmentationModel, xp: ModuleType) -> None:
        self.model = model
        self.xp = xp
        self.input = model.manifest.input.name
        self.output = model.manifest.output.name
        self.two_d = model.manifest.spatial_dims == 2
        self.cuda: Any | None = None
        self.device_id = 0
        if is_cupy(xp):
            self.device_id = int(xp.cuda.Device().id)
            self.cuda = cuda_session(model.model_path, self.device_id)
        self.cpu = cpu_session(model.model_path) if self.cuda is None else None

    def __call__(self, batch: Array) -> Array:
        """(B, C, z, y, x) float32 on xp's device -> (B, K, z, y, x) logits there."""
        xp = self.xp
        if self.two_d:  # (B, C, 1, y, x) -> (B, C, y, x)
            batch = batch[:, :, 0]
        if self.cuda is not None:
            out = self._run_cuda(batch)
        else:
            host = np.ascontiguousarray(to_host(batch), dtype=np.float32)
            (result,) = self.cpu.run([self.output], {self.input: host})  # type: ignore[union-attr]
            out = xp.asarray(result) if is_cupy(xp) else result
        return out[:, :, None] if self.two_d else out

    def _run_cuda(self, batch: Array) -> Array:
        xp = self.xp
        batch = xp.ascontiguousarray(batch, dtype=xp.float32)
        channels = self.model.manifest.channels_out
        out = xp.empty((batch.shape[0], channels, *batch.shape[2:]), dtype=xp.float32)
        binding = self.cuda.io_binding()  # type: ignore[union-attr]
        binding.bind_input(
            self.input, "cuda", self.device_id, np.float32, list(batch.shape), batch.data.ptr
        )
        binding.bind_output(
            self.output, "cuda", self.device_id, np.float32, list(out.shape), out.data.ptr
        )
        xp.cuda.get_current_stream().synchronize()  # ONNX Runtime uses its own stream
        binding.synchronize_inputs()
        self.cuda.run_with_iobinding(binding)  # type: ignore[union-attr]
        binding.synchronize_outputs()
        return out


def activate(xp: ModuleType, logits: Array, activation: str) -> Array:
    """Probabilities per channel (softmax over channels, or an independent sigmoid)."""
    if activation == "softmax":
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + xp.exp(-logits))


def sliding_window(
    model: SegmentationModel,
    image: Array,
    xp: ModuleType,
    *,
    overlap: float | None = None,
    batch_size: int = 1,
    blend: str = "gaussian",
) -> Array:
    """Blended class probabilities (K, z, y, x) for a normalised image at least one patch
    large in every axis."""
    manifest = model.manifest
    patch = manifest.patch3d
    overlap = manifest.overlap if overlap is None else overlap
    shape = tuple(int(n) for n in image.shape)
    if any(n < p for n, p in zip(shape, patch, strict=True)):
        raise ProcessorError(f"image {shape} is smaller than the patch {patch}")
    weight = gaussian_importance(xp, patch) if blend == "gaussian" else xp.ones(patch, xp.float32)
    channels = manifest.channels_out
    accumulated = xp.zeros((channels, *shape), dtype=xp.float32)
    norm = xp.zeros(shape, dtype=xp.float32)
    starts = [
        (z, y, x)
        for z in window_starts(shape[0], patch[0], overlap)
        for y in window_starts(shape[1], patch[1], overlap)
        for x in window_starts(shape[2], patch[2], overlap)
    ]
    runner = _Runner(model, xp)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first : first + batch_size]
        slices = [
            tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True)) for start in chunk
        ]
        batch = xp.stack([image[s] for s in slices])[:, None]
        probabilities = activate(xp, runner(batch), manifest.output.activation)
        for index, s in enumerate(slices):
            accumulated[(slice(None), *s)] += probabilities[index] * weight
            norm[s] += weight
    accumulated /= norm[None]
    return accumulated


def predict_probabilities(
    model: SegmentationModel,
    volume: Volume,
    xp: ModuleType,
    *,
    overlap: float | None = None,
    batch_size: int = 1,
    blend: str = "gaussian",
) -> tuple[Array, tuple[int, int, int], tuple[tuple[int, int, int], tuple[bool, bool, bool]]]:
    """Class probabilities on the model grid (K, z, y, x), the reoriented source shape,
    and the reorientation."""
    manifest = model.manifest
    perm, flips = reorientation(axis_codes(volume.orientation), manifest.orientation)
    image = apply_reorientation(xp, volume.array, perm, flips)
    spacing = tuple(volume.spacing[i] for i in perm)
    source_shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
    target = tuple(
        s if t is None else float(t) for s, t in zip(spacing, manifest.spacing, strict=True)
    )
    grid = target_shape(source_shape, spacing, target)
    image = resample_linear(xp, image, grid)
    image = normalize(xp, image, manifest.normalization)
    pad_value = float(
        to_host(
            normalize(xp, xp.full((1,), manifest.pad_value, xp.float32), manifest.normalization)
        )[0]
    )
    multiple = manifest.size_multiple
    padded = [
        max(p, math.ceil(n / multiple) * multiple)
        for n, p in zip(grid, manifest.patch3d, strict=True)
    ]
    if manifest.spatial_dims == 2:
        padded[0] = grid[0]
    pad = [(0, want - n) for want, n in zip(padded, grid, strict=True)]
    if any(after for _, after in pad):
        image = xp.pad(image, pad, mode="constant", constant_values=pad_value)
    probabilities = sliding_window(
        model, image, xp, overlap=overlap, batch_size=batch_size, blend=blend
    )
    probabilities = probabilities[:, : grid[0], : grid[1], : grid[2]]
    return probabilities, source_shape, (perm, flips)


def segment_volume(
    model: SegmentationModel,
    volume: Volume,
    xp: ModuleType,
    *,
    overlap: float | None = None,
    batch_size: int = 1,
    blend: str = "gaussian",
) -> Array:
    """The label map on the volume's own grid (uint8, or uint16 beyond 255 labels)."""
    probabilities, source_shape, (perm, flips) = predict_probabilities(
        model, volume, xp, overlap=overlap, batch_size=batch_size, blend=blend
    )
    dtype = xp.uint8 if len(model.manifest.labels) < 256 else xp.uint16
    softmax = model.manifest.output.activation == "softmax"
    # Probabilities back to the source grid one channel at a time, keeping the running
    # best: never K full-resolution maps at once. Sigmoid outputs compete with a constant
    # 0.5 background.
    if softmax:
        best = resample_linear(xp, probabilities[0], source_shape)
        first = 1
    else:
        best = xp.full(source_shape, 0.5, dtype=xp.float32)
        first = 0
    labels = xp.zeros(source_shape, dtype=dtype)
    for channel in range(first, probabilities.shape[0]):
        p = resample_linear(xp, probabilities[channel], source_shape)
        better = p > best
        labels[better] = channel + (0 if softmax else 1)
        best = xp.where(better, p, best)
    return xp.ascontiguousarray(undo_reorientation(xp, labels, perm, flips))


# --- The processors ---------------------------------------------------------------------


class ModelParams(ProcessorParams):
    overlap: float | None = Field(
        default=None, ge=0.0, le=0.9, description="patch overlap (default: the manifest's)"
    )
    batch_size: int = Field(default=2, ge=1, le=64, description="patches per ONNX Runtime call")
    blend: Literal["gaussian", "constant"] = Field(
        default="gaussian", description="weighting of overlapping patches"
    )
    measurements: bool = Field(default=True, description="volume and HU statistics per segment")


class OnnxSegmentation:
    """Base class: an ONNX segmentation model described by ``manifest_path``.

    Subclass with ``name``, ``version`` (must equal the manifest's) and ``manifest_path``;
    or use ``onnx_segmentation_processor``. ``is_available`` validates the model when the
    registry discovers it, so a bad model or manifest is listed as unavailable with the
    reason instead of failing a job.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    family: ClassVar[str] = "model"
    Params: ClassVar[type[ModelParams]] = ModelParams
    manifest_path: ClassVar[Path] = Path()

    @classmethod
    def model(cls) -> SegmentationModel:
        model = load_segmentation_model(cls.manifest_path)
        if model.manifest.version != cls.version:
            raise ModelError(
                f"{model.manifest_path}: manifest version {model.manifest.version!r} differs "
                f"from {cls.__name__}.version {cls.version!r}"
            )
        return model

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            importlib.import_module("onnxruntime")
        except Exception as exc:
            return False, f"onnxruntime is not importable: {type(exc).__name__}: {exc}"
        try:
            cls.model()
        except ModelError as exc:
            return False, str(exc)
        return True, ""

    def run(self, volume: Volume, params: ModelParams, xp: ModuleType) -> list[Result]:
        model = self.model()
        manifest = model.manifest
        if manifest.modality and volume.modality not in manifest.modality:
            raise ProcessorError(
                f"{manifest.name} is for {', '.join(manifest.modality)} images, "
                f"not {volume.modality}"
            )
        labels = segment_volume(
            model,
            volume,
            xp,
            overlap=params.overlap,
            batch_size=params.batch_size,
            blend=params.blend,
        )
        counts = to_host(xp.bincount(labels.ravel(), minlength=len(manifest.labels) + 1))
        segments = tuple(s for s in model.segments if int(counts[s.label]) > 0)
        description = f"{manifest.name} {manifest.version}"
        results: list[Result] = [LabelResult(labels, segments, volume, description)]
        if params.measurements and segments:
            stats = segment_statistics(
                xp,
                volume.array,
                labels,
                len(manifest.labels),
                volume.voxel_volume_mm3,
                intensity_unit(volume),
            )
            results.append(MeasurementResult(tuple(stats), description=f"{description} statistics"))
        return results


def onnx_segmentation_processor(
    name: str, manifest_path: Path | str, *, version: str | None = None
) -> type[OnnxSegmentation]:
    """A processor class for the model at ``manifest_path``, checked now.

    For a plugin module: ``MyModel = onnx_segmentation_processor("mymodel", HERE /
    "manifest.json")`` and the entry point ``mymodel = "mypkg.module:MyModel"``. A bad
    model or manifest raises ``ModelError`` here, so the registry lists the plugin as
    unavailable ("import failed: ModelError: ...").
    """
    model = load_segmentation_model(manifest_path)
    return type(
        f"OnnxSegmentation_{name}",
        (OnnxSegmentation,),
        {
            "name": name,
            "version": version or model.manifest.version,
            "manifest_path": Path(manifest_path),
            "__doc__": model.manifest.description or f"ONNX segmentation model {name}",
            "__module__": __name__,
        },
    )


class UNet(OnnxSegmentation):
    """The shipped 3-D U-Net: lungs and lesions in CT (``processors/models/unet/``)."""

    name: ClassVar[str] = "unet"
    version: ClassVar[str] = "1.1.0"
    manifest_path: ClassVar[Path] = UNET_MANIFEST
