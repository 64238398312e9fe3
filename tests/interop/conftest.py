"""Interop tests run real DCMTK tools against the node started as a subprocess."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from interop_support import RECEIVE_ONLY

from dicom_node.testing import NodeProcess, require_tool, start_node

pytestmark = pytest.mark.interop


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_installed() -> None:
    for tool in ("storescu", "echoscu", "dcmcjpeg", "dcmcjpls", "dcmcrle"):
        require_tool(tool)  # raises with the install command: a missing tool fails loudly


@pytest.fixture(scope="module")
def node_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node (two receiver processes) per test module; tests use their own studies. It
    has no rules, so no jobs: the inline executor spares the start of a Dask cluster."""
    directory = tmp_path_factory.mktemp("node")
    node = start_node(
        directory / "data", env={**RECEIVE_ONLY, "DICOM_NODE_RECEIVER_PROCESSES": "2"}
    )
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.stop()
