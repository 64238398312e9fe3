"""What an executor runs for a job: load the series, run the pipeline, write the outputs.

``run_job`` takes a ``JobSpec`` (plain data, pickled to a Dask worker) and touches no
database: it reads the spooled files and writes DICOM files under the spec's output
folder, which a remote worker must share with the node (the same storage). The node
records what comes back. A processor error, an unloadable series or an encoding problem
raises ``JobError`` with the reason; anything else propagates as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.encode.common import EncodeError
from dicom_node.logging import keep_patient_values_out_of_logs
from dicom_node.process import (
    ImageNotAcceptedError,
    OutputRecord,
    ProcessError,
    build_steps,
    process_series,
)
from dicom_node.security.crypto import load_keys
from dicom_node.security.keys import DecryptionError, KeyFileError
from dicom_node.volume import SeriesError
from processors.base import ProcessorError
from processors.errors import OperationFailedError
from processors.model_plugin import ModelRef, with_registered_models
from processors.registry import PluginChoice, apply_states, discover

STEPS_DIR = ".steps"
"""Under a job's output folder: one JSON file per finished step, listing its outputs, so
the node can send them while later steps still run (``written_steps``)."""


def record_to_json(record: OutputRecord) -> dict[str, str]:
    return {key: str(value) for key, value in dataclasses.asdict(record).items()}


def record_from_json(item: dict[str, str]) -> OutputRecord:
    return OutputRecord(**{**item, "path": Path(item["path"])})  # type: ignore[arg-type]


def _write_step(folder: Path, number: int, records: list[OutputRecord]) -> None:
    temporary = folder / f".{number:02d}.json.tmp"
    temporary.write_text(json.dumps([record_to_json(r) for r in records]))
    temporary.replace(folder / f"{number:02d}.json")


def written_steps(output_dir: Path, seen: set[str]) -> list[tuple[str, list[OutputRecord]]]:
    """The step files under ``output_dir`` not in ``seen``, with their outputs."""
    folder = output_dir / STEPS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("[0-9]*.json")):
        if path.name in seen:
            continue
        try:
            items = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced; read it next time
        found.append((path.name, [record_from_json(item) for item in items]))
    return found


class JobError(OperationFailedError):
    """The job cannot succeed as it stands; the message says why."""


class JobRefusedError(JobError):
    """The job's pipeline cannot take its images (``process.check_accepted``): it fails
    before any step runs, and at once, since another attempt would be refused alike."""


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    series_instance_uid: str
    paths: tuple[str, ...]
    pipeline: tuple[str, ...]
    params: dict[str, dict[str, Any]]
    output_dir: str
    device: str = "cpu"
    uid_root: str | None = None
    plugin_choices: dict[str, PluginChoice] = field(default_factory=dict)
    """The admins' choices (``plugin_state``) when the job was submitted: a disabled
    processor, or one pinned to a version other than the installed one, fails the job."""
    key_file: Path | None = None
    """``spool_encryption_key_file``: the worker reads it (the keys never travel in a spec)
    to decrypt the series and encrypt the outputs."""
    models: dict[str, ModelRef] = field(default_factory=dict)
    """The registered models the pipeline names (``model:<name>``), by step: the version
    the dispatcher resolved, its file on the shared storage."""


@dataclass(frozen=True)
class JobResult:
    job_id: int
    records: tuple[OutputRecord, ...]
    timings: tuple[tuple[str, float], ...]
    worker: str
    problems: tuple[str, ...] = field(default_factory=tuple)


def worker_name() -> str:
    """The Dask worker's address when running on one, else host and process id."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def run_job(spec: JobSpec) -> JobResult:
    keep_patient_values_out_of_logs()  # on a Dask worker, nobody configured logging
    if not spec.paths:
        raise JobError(f"series {spec.series_instance_uid} has no instances on disk")
    params = {name: spec.params.get(name, {}) for name in spec.pipeline if spec.params.get(name)}
    problems: list[str] = []
    timings: list[tuple[str, float]] = []
    steps_dir = Path(spec.output_dir) / STEPS_DIR
    shutil.rmtree(steps_dir, ignore_errors=True)  # an earlier attempt's
    steps_dir.mkdir(parents=True)
    try:
        keys = load_keys(spec.key_file)
        steps = build_steps(
            spec.pipeline,
            params=params,
            uid_root=spec.uid_root,
            plugins=with_registered_models(
                apply_states(discover(), spec.plugin_choices), spec.models
            ),
        )
        records = process_series(
            [Path(p) for p in spec.paths],
            steps,
            Path(spec.output_dir),
            spec.device,
            problems,
            timings,
            on_step_written=lambda number, written: _write_step(steps_dir, number, written),
            keys=keys,
        )
    except ImageNotAcceptedError as exc:
        raise JobRefusedError(str(exc)) from None
    except (
        ProcessError,
        SeriesError,
        EncodeError,
        ProcessorError,
        DecryptionError,
        KeyFileError,
    ) as exc:
        raise JobError(str(exc)) from None
    except FileNotFoundError as exc:
        raise JobError(f"a source file is missing: {exc.filename}") from None
    return JobResult(spec.job_id, tuple(records), tuple(timings), worker_name(), tuple(problems))
