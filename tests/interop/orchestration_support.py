"""Helpers for the end-to-end tests: node configuration, test plugins, waiting on jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from interop_support import cli_json as cli_json  # the tests' import
from interop_support import database_rows, wait_for_cli_json
from sqlalchemy import select

from db.models import Export, Job
from dicom_node.testing import NodeProcess, OrthancProcess, require_tool

FAULTY_PLUGINS = '''
"""Processors that misbehave, for the fault tests (installed as a throw-away distribution)."""
import os
import time
from typing import ClassVar

from pydantic import Field

from processors.base import ImageResult, ProcessorParams


class _Params(ProcessorParams):
    seconds: float = Field(default=4.0, ge=0)


class _Base:
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[_Params]] = _Params


class Raises(_Base):
    name: ClassVar[str] = "fail_raise"

    def run(self, volume, params, xp):
        raise ValueError("this plugin always fails: broken on purpose")


class Hangs(_Base):
    name: ClassVar[str] = "fail_hang"

    def run(self, volume, params, xp):
        time.sleep(3600)
        return []


class Exits(_Base):
    name: ClassVar[str] = "fail_exit"

    def run(self, volume, params, xp):
        os._exit(7)


class Hungry(_Base):
    name: ClassVar[str] = "fail_oom"

    def run(self, volume, params, xp):
        import numpy as np

        hoard = []
        for _ in range(200):  # up to 20 GB, 100 MB at a time: the nanny stops it first
            hoard.append(np.ones(100 * 2**20, dtype=np.uint8))
            time.sleep(0.05)
        return []


class Sleepy(_Base):
    name: ClassVar[str] = "sleepy"

    def run(self, volume, params, xp):
        time.sleep(params.seconds)
        return [ImageResult(volume, "Copy after a pause")]
'''


def install_test_plugins(directory: Path) -> Path:
    """A distribution on disk (module + dist-info) whose entry points add the test
    processors; put ``directory`` on PYTHONPATH of the node (its workers inherit it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "faulty_plugins.py").write_text(FAULTY_PLUGINS)
    info = directory / "faulty_plugins-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faulty-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[dicom_node.processors]\n"
        + "".join(
            f"{name} = faulty_plugins:{cls}\n"
            for name, cls in [
                ("fail_raise", "Raises"),
                ("fail_hang", "Hangs"),
                ("fail_exit", "Exits"),
                ("fail_oom", "Hungry"),
                ("sleepy", "Sleepy"),
            ]
        )
    )
    return directory


def plugin_env(directory: Path) -> dict[str, str]:
    """The environment that puts the test plugins of ``directory`` on the node's path."""
    return {"PYTHONPATH": f"{directory}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run_cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``dicom-node ARGS`` with the node's environment, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        env=node.env,
        capture_output=True,
        text=True,
        cwd=node.data_dir.parent,
        timeout=60,
    )


def write_config(path: Path, orthanc: OrthancProcess, body: str, **settings: object) -> Path:
    """A node.toml with the Orthanc destination "pacs", ``settings`` and rules ``body``."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    destination = f"""
        [[destinations]]
        name = "pacs"
        host = "127.0.0.1"
        port = {orthanc.dicom_port}
        ae_title = "{orthanc.ae_title}"
        timeout = 10
        """
    path.write_text("\n".join(lines) + textwrap.dedent(destination) + textwrap.dedent(body))
    return path


def wait_for_jobs(
    node: NodeProcess, count: int, states: tuple[str, ...], timeout: float = 120.0
) -> list[dict[str, Any]]:
    """The jobs once there are ``count`` of them, all in one of ``states``."""

    def done(jobs: list[dict[str, Any]]) -> bool:
        return len(jobs) == count and all(job["state"] in states for job in jobs)

    def likely_done() -> bool:
        found = database_rows(node, select(Job.state))
        return found is not None and len(found) == count and all(s in states for (s,) in found)

    try:
        return wait_for_cli_json(  # type: ignore[no-any-return]
            node, ("jobs",), done, likely_done=likely_done, timeout=timeout, interval=0.3
        )
    except AssertionError as error:
        raise AssertionError(
            f"jobs did not reach {states}: {error}\n{node.log()[-5000:]}"
        ) from None


def wait_for_exports(node: NodeProcess, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The exports once every one is delivered (or failed)."""
    finished = ("delivered", "failed")

    def done(exports: list[dict[str, Any]]) -> bool:
        return bool(exports) and all(e["state"] in finished for e in exports)

    def likely_done() -> bool:
        found = database_rows(node, select(Export.state))
        return bool(found) and all(s in finished for (s,) in found or ())

    try:
        return wait_for_cli_json(  # type: ignore[no-any-return]
            node,
            ("exports",),
            done,
            likely_done=likely_done,
            timeout=timeout,
            interval=0.3,
            node_runs=False,
        )
    except AssertionError as error:
        raise AssertionError(f"exports not delivered: {error}\n{node.log()[-5000:]}") from None


def orthanc_instances(orthanc: OrthancProcess) -> dict[str, dict[str, Any]]:
    """SOP Instance UID -> Orthanc's expanded instance."""
    found: list[dict[str, Any]] = orthanc.get_json("/instances?expand")  # type: ignore[assignment]
    return {item["MainDicomTags"]["SOPInstanceUID"]: item for item in found}


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
