"""The manifest of an ONNX segmentation model (format ``dicom-node-onnx-segmentation/1``):
its pydantic schema and ``read_manifest``, which names the file and the field at fault.
``docs/models.md`` describes every field."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from processors.base import ProcessorError

MANIFEST_FORMAT = "dicom-node-onnx-segmentation/1"


class ModelError(ProcessorError):
    """A model file or its manifest is unusable; the message names the file and why."""


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
    #: Test-time mirroring (nnU-Net's default): the logits are averaged over the image
    #: and its flips along every combination of these model-grid axes (0 slice, 1 row,
    #: 2 column).
    mirror_axes: tuple[int, ...] = ()
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
        if len({axis_of(letter) for letter in value}) != 3:
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
        allowed = (1, 2) if self.spatial_dims == 2 else (0, 1, 2)
        axes = list(self.mirror_axes)
        if len(set(axes)) != len(axes) or any(a not in allowed for a in axes):
            raise ValueError(f"mirror_axes must be distinct axes of {list(allowed)}, not {axes}")
        return self

    @property
    def patch3d(self) -> tuple[int, int, int]:
        if self.spatial_dims == 2:
            return (1, self.patch_size[0], self.patch_size[1])
        return (self.patch_size[0], self.patch_size[1], self.patch_size[2])

    @property
    def channels_out(self) -> int:
        return len(self.labels) + (1 if self.output.activation == "softmax" else 0)


def axis_of(letter: str) -> str:
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
