"""Models registered by an admin, as processors: ``model:<name>`` in a rule's pipeline.

The node keeps the registered models in its database and their files, content-addressed,
on the storage its nodes and workers share (``dicom_node.model_registry``). What a job
needs to run one travels as plain data, a ``ModelRef`` (the file to load, never the
database), so a Dask worker builds the processor from the ref alone. The registered
version is fixed by the ref: a newer upload or enabling another version changes what
later jobs get, never a running one.

An ONNX segmentation network runs as the ``model`` family (``processors.model``); a
scikit-learn classifier or regressor stored as ``.skops`` runs as the ``predict`` family
(``processors.predict``) with the file fixed, so its ``Params`` take nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar, Literal

from processors.base import ProcessorParams, Result, Volume
from processors.model import OnnxSegmentation
from processors.predict import load_model, predict_results
from processors.registry import PluginInfo

STEP_PREFIX = "model:"
"""A rule's pipeline names a registered model ``model:<name>``: the prefix keeps the
registered names apart from the entry-point plugins' (no upload can shadow a plugin)."""

MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

ModelRefKind = Literal["segmentation", "classification", "regression"]


def step_name(model_name: str) -> str:
    return f"{STEP_PREFIX}{model_name}"


def is_model_step(step: str) -> bool:
    return step.startswith(STEP_PREFIX)


@dataclass(frozen=True)
class ModelRef:
    """One registered model version as a job sees it: ``path`` is the manifest (ONNX) or
    the ``.skops`` file, on storage the workers share; ``enabled`` False fails the job
    with the reason."""

    name: str
    version: str
    kind: ModelRefKind
    path: str
    enabled: bool = True

    @property
    def step(self) -> str:
        return step_name(self.name)


class _NoParams(ProcessorParams):
    """A registered classifier or regressor takes no parameters: its file is fixed."""


class RegisteredPredict:
    """Base class of a registered ``.skops`` model: subclassed per ref with ``path``."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    family: ClassVar[str] = "predict"
    Params: ClassVar[type[ProcessorParams]] = _NoParams
    path: ClassVar[Path] = Path()

    def run(self, volume: Volume, params: ProcessorParams, xp: ModuleType) -> list[Result]:
        return predict_results(load_model(self.path), volume, xp)


def processor_class(ref: ModelRef) -> type[OnnxSegmentation] | type[RegisteredPredict]:
    """The processor class for ``ref``; nothing is loaded until it runs (or
    ``OnnxSegmentation.is_available`` is asked)."""
    attributes: dict[str, object] = {
        "name": ref.step,
        "version": ref.version,
        "__doc__": f"registered model {ref.name} {ref.version} ({ref.kind})",
        "__module__": __name__,
    }
    class_name = "Registered_" + re.sub(r"\W", "_", ref.name)
    if ref.kind == "segmentation":
        attributes["manifest_path"] = Path(ref.path)
        return type(class_name, (OnnxSegmentation,), attributes)
    return type(class_name, (RegisteredPredict,), {**attributes, "path": Path(ref.path)})


def model_plugin_info(ref: ModelRef) -> PluginInfo:
    """``ref`` as a discovered plugin (available; enabled as the ref says)."""
    processor = processor_class(ref)
    return PluginInfo(
        name=ref.step,
        entry_point=f"registered model {ref.name} ({ref.path})",
        builtin=False,
        available=True,
        reason="",
        version=ref.version,
        family=str(processor.family),
        processor=processor,
        enabled=ref.enabled,
    )


def with_registered_models(
    plugins: list[PluginInfo], refs: dict[str, ModelRef] | None
) -> list[PluginInfo]:
    """``plugins`` and the registered models of ``refs`` (by step name)."""
    if not refs:
        return plugins
    return [*plugins, *(model_plugin_info(ref) for ref in refs.values())]
