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

The manifest's schema is in ``model_manifest``, orientation and resampling in
``model_geometry``.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

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
from processors.file_cache import cached_per_file_version
from processors.model_geometry import (
    apply_reorientation,
    axis_codes,
    reorientation,
    resample_linear,
    target_shape,
    undo_reorientation,
)
from processors.model_manifest import (
    Manifest,
    ModelError,
    Normalization,
    WindowNormalization,
    ZScoreNormalization,
    read_manifest,
)
from processors.segment import intensity_unit, segment_statistics

__all__ = [
    "UNET_MANIFEST",
    "InferenceOptions",
    "ModelError",
    "OnnxSegmentation",
    "SegmentationModel",
    "UNet",
    "activate",
    "axis_codes",
    "cpu_session",
    "cuda_session",
    "load_segmentation_model",
    "normalize",
    "onnx_segmentation_processor",
    "predict_probabilities",
    "read_manifest",
    "resample_linear",
    "segment_volume",
    "sliding_window",
    "target_shape",
]

Array = Any

MODELS_DIR = Path(__file__).parent / "models"
UNET_MANIFEST = MODELS_DIR / "unet" / "manifest.json"


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
    """Read, validate and trial-run a model (cached per version of both files, so that a
    manifest or ONNX file replaced on disk is loaded and checked again)."""
    path = Path(manifest_path).resolve()
    if not path.is_file():
        raise ModelError(f"model manifest not found: {path}")
    manifest = _read_manifest(path)
    model_path = (path.parent / manifest.model).resolve()
    if not model_path.is_file():
        raise ModelError(f"{path}: model file not found: {model_path}")
    return _load(path, model_path)


@cached_per_file_version
def _read_manifest(path: Path) -> Manifest:
    return read_manifest(path)


@cached_per_file_version
def _load(path: Path, model_path: Path) -> SegmentationModel:
    manifest = _read_manifest(path)
    if manifest.sha256 is not None:
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
        if digest != manifest.sha256:
            raise ModelError(f"{model_path}: SHA-256 {digest} differs from the manifest's")
    model = SegmentationModel(manifest, path, model_path)
    check_session(model, cpu_session(model_path))
    return model


@cached_per_file_version
def cpu_session(model_path: Path) -> Any:
    """An ONNX Runtime session on the CPU for this version of the file."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from exc


@cached_per_file_version
def cuda_session(model_path: Path, device_id: int) -> Any | None:
    """A session on the CUDA execution provider for this version of the file, or ``None``
    where ONNX Runtime has none."""
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


@dataclass(frozen=True)
class InferenceOptions:
    """How a model runs over a volume: patch ``overlap`` (``None``: the manifest's),
    patches per ONNX Runtime call, the blending of overlapping patches, and whether to
    mirror along the manifest's ``mirror_axes``."""

    overlap: float | None = None
    batch_size: int = 1
    blend: Literal["gaussian", "constant"] = "gaussian"
    mirror: bool = True


def mirrored_logits(runner: Any, batch: Array, xp: ModuleType, axes: tuple[int, ...]) -> Array:
    """The model's logits for ``batch`` (B, C, z, y, x), averaged with those of its flips
    along every non-empty combination of ``axes`` (model-grid axes), flipped back."""
    logits = runner(batch)
    flips = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
    for combination in flips:
        spatial = tuple(2 + axis for axis in combination)
        logits = logits + xp.flip(runner(xp.flip(batch, axis=spatial)), axis=spatial)
    return logits / (1 + len(flips)) if flips else logits


def sliding_window(
    model: SegmentationModel,
    image: Array,
    xp: ModuleType,
    options: InferenceOptions = InferenceOptions(),
) -> Array:
    """Blended class probabilities (K, z, y, x) for a normalised image at least one patch
    large in every axis."""
    manifest = model.manifest
    patch = manifest.patch3d
    overlap = manifest.overlap if options.overlap is None else options.overlap
    batch_size = options.batch_size
    mirror_axes = manifest.mirror_axes if options.mirror else ()
    shape = tuple(int(n) for n in image.shape)
    if any(n < p for n, p in zip(shape, patch, strict=True)):
        raise ProcessorError(f"image {shape} is smaller than the patch {patch}")
    weight = (
        gaussian_importance(xp, patch)
        if options.blend == "gaussian"
        else xp.ones(patch, xp.float32)
    )
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
        logits = mirrored_logits(runner, batch, xp, mirror_axes)
        probabilities = activate(xp, logits, manifest.output.activation)
        for index, s in enumerate(slices):
            accumulated[(slice(None), *s)] += probabilities[index] * weight
            norm[s] += weight
    accumulated /= norm[None]
    return accumulated


def predict_probabilities(
    model: SegmentationModel,
    volume: Volume,
    xp: ModuleType,
    options: InferenceOptions = InferenceOptions(),
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
    # Every window is a whole patch, so only an image smaller than the patch is padded
    # (as MONAI's and nnU-Net's sliding windows do): padding every axis up to a size
    # multiple would put a wall of pad_value right after the last slice, which the
    # model never saw beside anatomy in training.
    padded = [max(p, n) for n, p in zip(grid, manifest.patch3d, strict=True)]
    if manifest.spatial_dims == 2:
        padded[0] = grid[0]
    pad = [(0, want - n) for want, n in zip(padded, grid, strict=True)]
    if any(after for _, after in pad):
        image = xp.pad(image, pad, mode="constant", constant_values=pad_value)
    probabilities = sliding_window(model, image, xp, options)
    probabilities = probabilities[:, : grid[0], : grid[1], : grid[2]]
    return probabilities, source_shape, (perm, flips)


def segment_volume(
    model: SegmentationModel,
    volume: Volume,
    xp: ModuleType,
    options: InferenceOptions = InferenceOptions(),
) -> Array:
    """The label map on the volume's own grid (uint8, or uint16 beyond 255 labels)."""
    probabilities, source_shape, (perm, flips) = predict_probabilities(model, volume, xp, options)
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
    mirror: bool = Field(
        default=True, description="test-time mirroring along the manifest's mirror_axes"
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
        options = InferenceOptions(params.overlap, params.batch_size, params.blend, params.mirror)
        labels = segment_volume(model, volume, xp, options)
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
    version: ClassVar[str] = "1.2.0"
    manifest_path: ClassVar[Path] = UNET_MANIFEST
