"""Script API for notebooks, tests and the worker: run a processor on an array or Volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from processors.backend import Backend, resolve, to_device, to_host
from processors.base import (
    ImageResult,
    LabelResult,
    MeasurementResult,
    Processor,
    ProcessorError,
    Result,
    Volume,
    accepts_of,
    luminance,
    stamp,
)
from processors.registry import PluginInfo, discover, get_processor


def volume_to(volume: Volume, backend: Backend) -> Volume:
    return replace(volume, array=to_device(volume.array, backend))


def result_to_host(result: Result) -> Result:
    """The same result with every array as a NumPy array."""
    if isinstance(result, ImageResult):
        return replace(result, volume=replace(result.volume, array=to_host(result.volume.array)))
    if isinstance(result, LabelResult):
        return replace(
            result,
            labels=to_host(result.labels),
            geometry=replace(result.geometry, array=to_host(result.geometry.array)),
        )
    return result


def run_on_backend(
    processor: Processor, volume: Volume, params: Any, backend: Backend
) -> list[Result]:
    """Run with ``volume`` already on the backend's device, that device current for the
    run only; results stay there. A processor is given only what it declares it takes
    (``processors.base.Accepts``): refused with the reason otherwise, and a greyscale
    one gets a colour image's luminance."""
    accepts = accepts_of(processor)
    refusal = accepts.refusal(processor.name, volume)
    if refusal is not None:
        raise ProcessorError(refusal)
    with backend.on_device():
        if not accepts.colour:
            volume = luminance(volume, backend.xp)
        results = processor.run(volume, params, backend.xp)
    return stamp(results, processor.name, processor.version)


def run_processor(
    name: str,
    array: Any,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    device: str = "cpu",
    *,
    plugins: Sequence[PluginInfo] | None = None,
    **params: Any,
) -> list[Result]:
    """Run processor ``name`` on a 3-D array (or a ``Volume``) and return host results.

    ``params`` are validated by the processor's ``Params`` model: a bad value raises
    ``pydantic.ValidationError`` naming the field. ``device`` is ``auto``, ``cpu`` or
    ``cuda:N``; the array moves to the device once and the results come back once.
    """
    processor = get_processor(name, discover() if plugins is None else plugins)
    validated = processor.Params(**params)
    backend = resolve(device)
    if isinstance(array, Volume):
        volume = volume_to(array, backend)
    else:
        z, y, x = (float(s) for s in spacing)
        volume = Volume(to_device(array, backend), spacing=(z, y, x))
    results = run_on_backend(processor, volume, validated, backend)
    return [result_to_host(r) for r in results]


def run_pipeline(
    steps: Sequence[tuple[str, dict[str, Any]]],
    volume: Volume,
    device: str = "cpu",
    *,
    plugins: Sequence[PluginInfo] | None = None,
) -> list[Result]:
    """Chain processors: each step's first ImageResult (if any) feeds the next step.

    Data stays on the device between steps; every step's results are returned, on the host.
    """
    infos = discover() if plugins is None else plugins
    backend = resolve(device)
    current = volume_to(volume, backend)
    collected: list[Result] = []
    for name, params in steps:
        processor = get_processor(name, infos)
        results = run_on_backend(processor, current, processor.Params(**params), backend)
        collected.extend(results)
        images = [r for r in results if isinstance(r, ImageResult)]
        if images:
            current = images[0].volume
    return [result_to_host(r) for r in collected]


__all__ = [
    "ImageResult",
    "LabelResult",
    "MeasurementResult",
    "result_to_host",
    "run_on_backend",
    "run_pipeline",
    "run_processor",
]
