"""The pynetdicom internals the node relies on are still there and still behave as
``dicom_node/ae/pynetdicom_internals.py`` expects; each failure names the internal."""

from __future__ import annotations

import threading
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.ae.pynetdicom_internals import PYNETDICOM_CHECKED

PYPROJECT = Path(__file__).parents[3] / "pyproject.toml"


def changed(internal: str, relied_on_by: str) -> str:
    return (
        f"pynetdicom {metadata.version('pynetdicom')} changed {internal}, which {relied_on_by} in"
        " dicom_node/ae/pynetdicom_internals.py relies on: re-check that module, then the"
        f" pin (checked: pynetdicom{PYNETDICOM_CHECKED})"
    )


def test_pyproject_pins_pynetdicom_to_the_checked_versions() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [pin] = [Requirement(d) for d in dependencies if Requirement(d).name == "pynetdicom"]
    assert pin.specifier == Requirement(f"pynetdicom{PYNETDICOM_CHECKED}").specifier
    installed = metadata.version("pynetdicom")  # 3.0.0's __version__ says 3.0.0.dev0
    assert pin.specifier.contains(installed), (
        f"pynetdicom {installed} is installed; checked: {PYNETDICOM_CHECKED}"
    )


def test_association_reactor_can_be_paused() -> None:
    assoc = Association(AE(), "requestor")
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    assert isinstance(checkpoint, threading.Event), changed(
        "Association._reactor_checkpoint", "paused_reactor"
    )
    assert getattr(assoc, "_is_paused", None) is False, changed(
        "Association._is_paused", "paused_reactor"
    )
    for method in ("send_msg", "get_msg"):
        assert callable(getattr(assoc.dimse, method, None)), changed(
            f"DIMSEServiceProvider.{method}", "paused_reactor's callers (tests)"
        )
