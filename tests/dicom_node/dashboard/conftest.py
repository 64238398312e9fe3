"""The API harness of the API tests: the dashboard is served by the same app."""

from __future__ import annotations

from tests.dicom_node.api.conftest import api

__all__ = ["api"]
