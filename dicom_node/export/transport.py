"""What a transport is: one way of sending a destination's files (C-STORE, STOW-RS, ...).

A transport is a module (or any object) with a ``send`` function of this shape; it never
touches the export queue. It answers one ``Outcome`` per file and raises nothing for a
peer that is down or refuses: that is an outcome too. ``dicom_node.export.worker``
maps a destination's ``kind`` to its transport, so a new one is a module and a line there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.export.target import ExportTarget
from dicom_node.scu import SendFile

OnSent = Callable[[SendFile, int | None], None]
"""Called after each instance a transport sent with a DIMSE status (``None``: no answer)."""


@dataclass(frozen=True)
class Outcome:
    """What became of one file: delivered, or not with the reason."""

    delivered: bool
    error: str | None = None


class Transport(Protocol):
    def send(
        self, target: ExportTarget, files: Sequence[SendFile], on_sent: OnSent | None
    ) -> dict[Path, Outcome]:
        """Send ``files`` to ``target``; an ``Outcome`` for every file's path."""
        ...
