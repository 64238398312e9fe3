"""What an executor runs for a job: load the series, run the pipeline, write the outputs.

``run_job`` takes a ``JobSpec`` (plain data, pickled to a Dask worker) and touches no
database: it reads the spooled files and writes DICOM files under the spec's output
folder, which a remote worker must share with the node (the same storage). The node
records what comes back. A processor error, an unloadable series or an encoding problem
raises ``JobError`` with the reason; anything else propagates as it is.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.encode.common import EncodeError
from dicom_node.process import OutputRecord, ProcessError, build_steps, process_series
from dicom_node.volume import SeriesError
from processors.base import ProcessorError


class JobError(RuntimeError):
    """The job cannot succeed as it stands; the message says why."""


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
    if not spec.paths:
        raise JobError(f"series {spec.series_instance_uid} has no instances on disk")
    params = {name: spec.params.get(name, {}) for name in spec.pipeline if spec.params.get(name)}
    problems: list[str] = []
    timings: list[tuple[str, float]] = []
    try:
        steps = build_steps(spec.pipeline, params=params, uid_root=spec.uid_root)
        records = process_series(
            [Path(p) for p in spec.paths],
            steps,
            Path(spec.output_dir),
            spec.device,
            problems,
            timings,
        )
    except (ProcessError, SeriesError, EncodeError, ProcessorError) as exc:
        raise JobError(str(exc)) from None
    except FileNotFoundError as exc:
        raise JobError(f"a source file is missing: {exc.filename}") from None
    return JobResult(spec.job_id, tuple(records), tuple(timings), worker_name(), tuple(problems))
