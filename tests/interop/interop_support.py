"""Helpers for the interop tests (a module of its own: every test folder has a conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.sql import Select

from db.models import Instance, Series, Study
from dicom_node.testing import NodeProcess

# A `dicom-node ... --json` is a Python start (about a second of CPU): the waits below read
# the node's database directly, which costs milliseconds, and run the CLI when that says
# the condition holds, or every CLI_FALLBACK_SECONDS in any case.
CLI_FALLBACK_SECONDS = 5.0

# The environment of a node that receives without rules (no jobs to run): the inline
# executor instead of an embedded Dask cluster, whose start costs seconds of CPU.
RECEIVE_ONLY = {"DICOM_NODE_EXECUTOR": "inline"}


def cli_json(node: NodeProcess, *args: str) -> object:
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args, "--json"],
        env=node.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(result.stdout)


def database_rows(node: NodeProcess, statement: Select[Any]) -> list[Any] | None:
    """The rows of ``statement`` on the node's database; None while it cannot be read (not
    made or migrated yet, locked)."""
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(statement))
    except Exception:  # only a hint: the CLI decides
        return None
    finally:
        engine.dispose()


def wait_for_cli_json(
    node: NodeProcess,
    args: tuple[str, ...],
    done: Callable[[Any], bool],
    *,
    likely_done: Callable[[], bool],
    timeout: float,
    interval: float = 0.2,
    node_runs: bool = True,
) -> Any:
    """`dicom-node ARGS --json` once ``done`` holds for it. ``likely_done`` (a cheap read of
    the database) says when to ask the CLI; it is asked every CLI_FALLBACK_SECONDS anyway.
    Raises AssertionError with the last answer after ``timeout`` seconds, or as soon as
    the node exits if ``node_runs``."""
    deadline = time.monotonic() + timeout
    last_asked = time.monotonic()
    answer: Any = None
    while True:
        now = time.monotonic()
        if now - last_asked >= CLI_FALLBACK_SECONDS or likely_done() or now >= deadline:
            last_asked = now
            answer = cli_json(node, *args)
            if done(answer):
                return answer
            if now >= deadline:
                raise AssertionError(f"`dicom-node {' '.join(args)}` still says: {answer}")
        if node_runs and node.process.poll() is not None:
            raise AssertionError(f"the node exited:\n{node.log()[-5000:]}")
        time.sleep(interval)


def wait_for_study(
    node: NodeProcess, study_instance_uid: str, expected: int, timeout: float = 30.0
) -> dict[str, object]:
    """The study's row from `dicom-node studies --json` once it has ``expected`` instances."""

    def this_study(studies: list[dict[str, object]]) -> list[dict[str, object]]:
        return [s for s in studies if s["study_instance_uid"] == study_instance_uid]

    def done(studies: list[dict[str, object]]) -> bool:
        found = this_study(studies)
        return bool(found) and found[0]["num_instances"] == expected

    counted = (
        select(func.count(Instance.id))
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.study_instance_uid == study_instance_uid)
    )
    try:
        studies = wait_for_cli_json(
            node,
            ("studies",),
            done,
            likely_done=lambda: database_rows(node, counted) == [(expected,)],
            timeout=timeout,
        )
    except AssertionError as error:
        raise AssertionError(f"expected {expected} instances of {study_instance_uid}") from error
    return this_study(studies)[0]


def with_new_uids(dataset, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Save a copy of ``dataset`` as a new study/series/instance."""
    import copy

    from pydicom.uid import generate_uid

    fresh = copy.deepcopy(dataset)
    fresh.StudyInstanceUID = generate_uid()
    fresh.SeriesInstanceUID = generate_uid()
    fresh.SOPInstanceUID = fresh.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    fresh.save_as(path, enforce_file_format=True)
    return path
