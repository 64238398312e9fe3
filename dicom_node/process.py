"""Offline processing: a folder of DICOM files -> pipeline -> SEG / SR / derived series.

``process_directory`` reads the folder (recursively), groups the image instances by
series, and for one series at a time: loads its ``Volume``, runs the pipeline's steps
(each step's first ``ImageResult`` feeds the next, as in ``processors.api.run_pipeline``),
encodes every result (``dicom_node.encode``) with deterministic UIDs and writes it under
``OUTPUT/<source series UID>/<step>-<processor>-<kind>-<n>/``. Series that cannot be
loaded are skipped with their reason; a folder with no usable series raises
``NoUsableSeriesError``. No network and no database: this is also what a job runs on a
Dask worker (``dicom_node.jobs.worker``); recording the outputs is the node's side
(``dicom_node.outputs``; the CLI does so only when given ``--config``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.encode.common import EncodeError, add_absent_type_2, blank_unparseable_values
from dicom_node.encode.derived import derived_instances
from dicom_node.encode.planar_derived import planar_derived_instances
from dicom_node.encode.seg import SegEncoding, encode_seg, write_streamed
from dicom_node.encode.sr import encode_sr
from dicom_node.encode.uids import Provenance, check_root
from dicom_node.image import datasets_to_image_or_volume, read_image_file
from dicom_node.security.crypto import save_dataset
from dicom_node.security.keys import KeyRing
from dicom_node.slide_process import is_slide_series, process_slide
from dicom_node.volume import SeriesError
from processors.api import result_to_host, run_on_backend, volume_to
from processors.backend import resolve
from processors.base import (
    ImageResult,
    LabelResult,
    MeasurementResult,
    ProcessorError,
    Result,
    Volume,
    accepts_of,
)
from processors.errors import BadInputError
from processors.registry import (
    PluginInfo,
    ProcessorUnavailableError,
    UnknownProcessorError,
    discover,
    get_processor,
)


class ProcessError(BadInputError):
    """The command cannot run at all (bad pipeline, no usable series)."""


class NoUsableSeriesError(ProcessError):
    """No series in the folder could be loaded as an image volume."""


@dataclass(frozen=True)
class OutputRecord:
    """One written DICOM instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    kind: str  # seg, sr or derived
    path: Path
    source_series_uid: str
    processor_name: str
    processor_version: str
    params: str


@dataclass
class ProcessReport:
    outputs: list[OutputRecord] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (series or path, reason)


def parse_pipeline(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ProcessError("the pipeline names no processor")
    return names


def parse_params(values: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` options -> {processor: {key: value}}; values are JSON or strings."""
    out: dict[str, dict[str, Any]] = {}
    for text in values:
        target, sep, raw = text.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name or not key:
            raise ProcessError(f"--param {text!r}: expected PROCESSOR.KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name.strip(), {})[key.strip()] = value
    return out


def scan_series(
    directory: Path,
) -> tuple[dict[str, list[Path]], list[tuple[str, str]]]:
    """Image files grouped by SeriesInstanceUID, and the files skipped with why."""
    if not directory.is_dir():
        raise ProcessError(f"{directory} is not a folder")
    groups: dict[str, list[Path]] = {}
    skipped: list[tuple[str, str]] = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            ds = read_image_file(path, None, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            skipped.append((str(path), f"not DICOM: {exc}"))
            continue
        except Exception as exc:  # a corrupt header can raise almost anything
            skipped.append((str(path), f"unreadable: {exc}"))
            continue
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:
            skipped.append((str(path), "not an image"))
            continue
        if str(ds.get("Modality", "")) == "SEG":
            skipped.append((str(path), "a segmentation, not an image"))
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return groups, skipped


@dataclass(frozen=True)
class Step:
    name: str
    processor: Any
    params: Any
    provenance: Provenance


def build_steps(
    names: Sequence[str],
    *,
    params: dict[str, dict[str, Any]] | None = None,
    uid_root: str | None = None,
    plugins: Sequence[PluginInfo] | None = None,
) -> list[Step]:
    """Resolve the processors, validate their parameters, and each step's provenance.

    ``params`` maps a processor name to its parameters (defaults for the rest).
    """
    check_root(uid_root)
    params = params or {}
    strays = sorted(set(params) - set(names))
    if strays:
        raise ProcessError(f"parameters for {', '.join(strays)}, which is not in the pipeline")
    infos = discover() if plugins is None else plugins
    steps: list[Step] = []
    upstream: list[str] = []
    for name in names:
        try:
            processor = get_processor(name, infos)
        except (UnknownProcessorError, ProcessorUnavailableError) as exc:
            raise ProcessError(str(exc)) from exc
        try:
            validated = processor.Params(**params.get(name, {}))
        except ValidationError as exc:
            raise ProcessError(f"{name}: invalid parameters: {exc}") from exc
        provenance = Provenance(
            processor=processor.name,
            version=processor.version,
            family=processor.family,
            params=validated.model_dump(mode="json"),
            upstream=tuple(upstream),
            uid_root=uid_root,
        )
        steps.append(Step(name, processor, validated, provenance))
        upstream.append(f"{processor.name}@{processor.version}:{provenance.params_json}")
    return steps


def _write(ds: Dataset, path: Path, keys: KeyRing | None) -> Path:
    """Write ``ds`` beside ``path`` and rename it there: a run of the job again (after a
    restart, on the same input) replaces a file the exporter may be sending whole, never
    with a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_dataset(ds, partial, keys)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def encode_results(
    results: Sequence[Result],
    sources: Sequence[Dataset],
    volume: Volume,
    step: Step,
    folder: Path,
    problems: list[str] | None = None,
    keys: KeyRing | None = None,
) -> list[OutputRecord]:
    """Encode one step's results and write them under ``folder`` (encrypted with ``keys``).

    A derived series that cannot be encoded (say, from a multi-frame source) is left out
    with its reason in ``problems``; the step's SEG and SR are still written.
    """
    provenance = step.provenance
    series_uid = volume.series_instance_uid or str(sources[0].SeriesInstanceUID)
    records: list[OutputRecord] = []
    counters = {"seg": 0, "sr": 0, "derived": 0}
    segs: list[tuple[SegEncoding, LabelResult]] = []

    def write(kind: str, ds: Dataset, path: Path, seg: SegEncoding | None = None) -> None:
        """Each object is written as soon as it is made: a derived series is never held
        whole in memory, nor a whole slide's SEG (its frames follow its header)."""
        if seg is not None and seg.frames is not None:
            write_streamed(seg, path, keys)
        else:
            _write(ds, path, keys)
        records.append(
            OutputRecord(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                kind=kind,
                path=path,
                source_series_uid=series_uid,
                processor_name=provenance.processor,
                processor_version=provenance.version,
                params=provenance.params_json,
            )
        )

    # A segmentation that found nothing, or a report with nothing in it, is no object.
    results = [
        r
        for r in results
        if not (isinstance(r, LabelResult) and not r.segments)
        and not (isinstance(r, MeasurementResult) and not (r.measurements or r.classifications))
    ]
    for result in results:
        if isinstance(result, LabelResult):
            n = counters["seg"]
            try:
                encoding = encode_seg(result, sources, provenance, index=n)
            except EncodeError as exc:
                if problems is None or not result.geometry.planar:
                    raise
                problems.append(f"{provenance.processor}: no SEG: {exc}")
                continue
            segs.append((encoding, result))
            write("seg", encoding.dataset, folder / f"seg-{n}" / "0001.dcm", encoding)
            counters["seg"] += 1
        elif isinstance(result, ImageResult):
            n = counters["derived"]
            make = planar_derived_instances if result.volume.planar else derived_instances
            try:
                derived = make(result, sources, provenance, index=n)
            except EncodeError as exc:
                if problems is None:
                    raise
                problems.append(f"{provenance.processor}: no derived series: {exc}")
                continue
            for z, ds in enumerate(derived):
                write("derived", ds, folder / f"derived-{n}" / f"{z + 1:04d}.dcm")
            counters["derived"] += 1
    for result in results:
        if isinstance(result, MeasurementResult):
            n = counters["sr"]
            seg, labels = segs[0] if len(segs) == 1 else (None, None)
            report = encode_sr(
                result, sources, provenance, geometry=volume, seg=seg, labels=labels, index=n
            )
            write("sr", report, folder / f"sr-{n}" / "0001.dcm")
            counters["sr"] += 1
    return records


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def return_freed_memory_promptly() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, given back
    to the system when freed (whether it did: False off glibc).

    By default glibc raises that threshold to the size of the largest block freed (up to
    32 MiB), after which a step's slab-sized temporaries come from the heap and stay in
    the process's resident set when freed, more so with the encoder's thread (an arena
    of its own): the peak of a 200-slice CT went from 0.78 to 1.06 GB between runs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))


def geometry_of(volume: Volume) -> Volume:
    """``volume`` without its voxels (a read-only zero view of its shape, no memory): what
    the encoders need of a source, so that its array can be freed once processed."""
    return dataclasses.replace(volume, array=np.broadcast_to(np.float32(0), volume.shape))


def drop_pixel_data(datasets: Sequence[Dataset]) -> None:
    """Free the source files' pixel data once the volume is built: the encoders copy
    headers and references, never a source's pixels (``derived.DROPPED``)."""
    for ds in datasets:
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)


class ImageNotAcceptedError(ProcessorError):
    """A step of the pipeline cannot take these images: running it again cannot help."""


def check_accepted(steps: Sequence[Step], volume: Volume) -> None:
    """Refuse, before any work, a pipeline with a step that cannot take this image
    (``processors.base.Accepts``), naming the step and why."""
    for step in steps:
        refusal = accepts_of(step.processor).refusal(step.name, volume)
        if refusal is not None:
            raise ImageNotAcceptedError(refusal)


def process_series(
    paths: Iterable[Path],
    steps: Sequence[Step],
    output: Path,
    device: str = "cpu",
    problems: list[str] | None = None,
    timings: list[tuple[str, float]] | None = None,
    on_step_written: Callable[[int, list[OutputRecord]], None] | None = None,
    keys: KeyRing | None = None,
) -> list[OutputRecord]:
    """Run the pipeline on one series' files and write every output.

    ``keys``: the files are read through them when encrypted, and the outputs written
    encrypted (``dicom_node.security.crypto``).

    ``on_step_written(step_number, records)`` is called (on the encoder thread, in step
    order) as soon as a step's outputs are on disk.

    Each step's results are encoded and written on a second thread while the next step
    runs (encoding is Python, the steps are mostly NumPy/SciPy that release the GIL).
    ``timings`` receives (stage, seconds) for the load, each step's run and encode, and
    the wait for the last encodes after the last step.
    """
    return_freed_memory_promptly()
    paths = list(paths)
    if is_slide_series(paths, keys):  # tiled, never loaded whole (dicom_node.slide_process)
        return process_slide(paths, steps, output, device, problems, timings, on_step_written, keys)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        if timings is not None:
            timings.append((stage, now - clock))
        clock = now

    def encode(number: int, results: list[Result], step: Step, folder: Path) -> list[OutputRecord]:
        started = time.perf_counter()
        written = encode_results(results, datasets, volume, step, folder, problems, keys)
        if timings is not None:
            timings.append((f"{step.name}:encode", time.perf_counter() - started))
        if on_step_written is not None:
            on_step_written(number, written)
        return written

    datasets = [read_image_file(path, keys) for path in paths]
    loaded = datasets_to_image_or_volume(datasets)
    check_accepted(steps, loaded)
    drop_pixel_data(datasets)
    blanked = blank_unparseable_values(datasets)
    if blanked and problems is not None:
        problems.append(f"left empty in the outputs, not a valid value: {', '.join(blanked)}")
    absent = add_absent_type_2(datasets)
    if absent and problems is not None:
        problems.append(f"absent from the source, empty in the outputs: {', '.join(absent)}")
    backend = resolve(device)
    current = volume_to(loaded, backend)
    volume = geometry_of(loaded)
    del loaded  # the steps hold the voxels (``current``) only while they need them
    series_uid = volume.series_instance_uid or "unknown"
    lap("load")
    encoding: list[Future[list[OutputRecord]]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="encode") as encoder:
        for number, step in enumerate(steps, start=1):
            results = run_on_backend(step.processor, current, step.params, backend)
            host = [result_to_host(r) for r in results]
            lap(f"{step.name}:run")
            folder = output / series_uid / f"{number:02d}-{step.provenance.processor}"
            encoding.append(encoder.submit(encode, number, host, step, folder))
            images = [r for r in results if isinstance(r, ImageResult)]
            if images:
                current = images[0].volume
        records = [record for future in encoding for record in future.result()]
    lap("encode:wait")
    return records


ProgressCallback = Callable[[str, int, int], None]


def process_directory(
    input_dir: Path,
    output_dir: Path,
    steps: Sequence[Step],
    *,
    device: str = "cpu",
    on_series: ProgressCallback | None = None,
) -> ProcessReport:
    """Process every image series under ``input_dir`` into ``output_dir`` with ``steps``
    (``build_steps``, which checks the pipeline before any work).

    ``on_series(series_uid, done, total)`` is called after each series (for a progress
    bar). Raises ``NoUsableSeriesError`` when not one series could be processed.
    """
    groups, skipped_files = scan_series(input_dir)
    report = ProcessReport(skipped=list(skipped_files))
    if not groups:
        raise NoUsableSeriesError(
            f"{input_dir}: no DICOM image series found ({len(skipped_files)} file(s) skipped)"
        )
    for done, (series_uid, paths) in enumerate(sorted(groups.items()), start=1):
        problems: list[str] = []
        try:
            report.outputs += process_series(paths, steps, output_dir, device, problems)
            report.processed.append(series_uid)
            report.skipped += [(series_uid, problem) for problem in problems]
        except (SeriesError, EncodeError, ProcessorError) as exc:
            report.skipped.append((series_uid, str(exc)))
        if on_series is not None:
            on_series(series_uid, done, len(groups))
    if not report.processed:
        reasons = "; ".join(f"{uid}: {why}" for uid, why in report.skipped if uid in groups)
        raise NoUsableSeriesError(f"{input_dir}: no usable series ({reasons})")
    return report
