"""Fixtures of the export tests: a migrated SQLite database and a generated series."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.synthetic import generate_series
from tests.dicom_node.export.export_support import migrated_sessions


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_sessions(f"sqlite:///{tmp_path / 'exports.db'}") as sessions:
        yield sessions


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    series = generate_series(num_slices=5, rows=64, columns=64, uid_seed="export-unit")
    return series.write(tmp_path_factory.mktemp("series"))
