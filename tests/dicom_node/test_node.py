"""The node in-process: what it leaves behind in the process that runs it."""

from __future__ import annotations

from pydicom import config
from pynetdicom import _config

from dicom_node.config import Settings
from dicom_node.node import Node


def _library_switches() -> tuple[object, ...]:
    return (
        config.settings.reading_validation_mode,
        config.settings.writing_validation_mode,
        _config.UNRESTRICTED_STORAGE_SERVICE,
    )


def test_a_running_node_leaves_process_wide_library_switches_alone(settings: Settings) -> None:
    before = _library_switches()
    node = Node(settings)
    node.start()
    try:
        assert _library_switches() == before
    finally:
        node.stop(1)
    assert _library_switches() == before
