"""Device names (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked without importing an
array library: the settings check ``processing_device`` on every command, and a command
that never processes should not pay for NumPy. ``processors.backend`` resolves them."""

from __future__ import annotations

import re

from processors.errors import BadInputError

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


class BackendError(BadInputError):
    """The requested device cannot be used; the message says why."""


def parse_device(device: str) -> tuple[str, int]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> (kind, index)."""
    match = _DEVICE_PATTERN.match(device.strip().lower())
    if match is None:
        raise BackendError(f"device must be auto, cpu or cuda:N, not {device!r}")
    kind = match.group(1).split(":")[0]
    return kind, int(match.group(2) or 0)
