"""Shared fixtures: settings in a temp dir, a node running in-process, generated series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.synthetic import SyntheticSeries, generate_series
from dicom_node.testing import local_settings


@pytest.fixture(autouse=True)
def _no_node_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set their own settings; a developer's DICOM_NODE_* variables must not leak in."""
    import os

    for key in list(os.environ):
        if key.startswith("DICOM_NODE_"):
            monkeypatch.delenv(key)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return local_settings(tmp_path)


@pytest.fixture
def node(settings: Settings) -> Iterator[Node]:
    running = Node(settings)
    running.start()
    try:
        yield running
    finally:
        running.stop(grace_seconds=5)


@pytest.fixture(scope="session")
def small_ct() -> SyntheticSeries:
    return generate_series(num_slices=6, rows=128, columns=128, uid_seed="small-ct")


@pytest.fixture(scope="session")
def ct_series_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticSeries, Path]:
    """A realistic 512x512 CT series written to disk (20 slices)."""
    series = generate_series(num_slices=20, uid_seed="ct-512")
    directory = tmp_path_factory.mktemp("ct512")
    series.write(directory)
    return series, directory
