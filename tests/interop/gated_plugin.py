"""A test processor that holds its job until the test opens a gate (a file appears), so a
test acts while a job is surely running, with no race against a sleep."""

from __future__ import annotations

import os
from pathlib import Path

GATED_PLUGIN = '''
"""The processor ``gated``: a copy of its input once the file ``gate`` exists."""
import time
from pathlib import Path
from typing import ClassVar

from processors.base import ImageResult, ProcessorParams


class _Params(ProcessorParams):
    gate: str = ""


class Gated:
    name: ClassVar[str] = "gated"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[_Params]] = _Params

    def run(self, volume, params, xp):
        deadline = time.monotonic() + 300
        while not Path(params.gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return [ImageResult(volume, "Copy once the gate opened")]
'''


def gated_plugin_env(directory: Path) -> dict[str, str]:
    """Install the ``gated`` processor as a throw-away distribution under ``directory``;
    the environment that puts it on a node's path (its workers inherit it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gated_plugin_module.py").write_text(GATED_PLUGIN)
    info = directory / "gated_plugin_module-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gated-plugin-module\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[dicom_node.processors]\ngated = gated_plugin_module:Gated\n"
    )
    return {"PYTHONPATH": f"{directory}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def gated_rule(gate: Path, destinations: str = '["pacs"]') -> str:
    """A rule that runs ``gated`` on every CT and sends its outputs to ``destinations``."""
    return f"""
[[rules]]
name = "gated"
match = {{ Modality = "CT" }}
pipeline = ["gated"]
params = {{ gated = {{ gate = "{gate}" }} }}
destinations = {destinations}
"""
