"""An API harness (app, client, a token per role) on a fresh database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.api.testing import ApiHarness, api_harness, settings_for


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    with api_harness(settings_for(tmp_path)) as harness:
        yield harness
