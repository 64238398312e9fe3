"""What the node takes from pynetdicom below its ``AE`` API, and why.

Read against pynetdicom 3.0.4; ``pyproject.toml`` pins ``PYNETDICOM_CHECKED``, and
``tests/dicom_node/ae/test_pynetdicom_internals.py`` fails, naming the piece, when one of
these stops being what the code here expects: re-check before widening the pin.

The receive path (``dicom_node.ae``) is the node's own and takes only pynetdicom's public
SOP class lists (``AllStoragePresentationContexts``, ``pynetdicom.sop_class``); its tests
check its PDUs against pynetdicom's codecs. The sending side (``dicom_node.scu``,
``dicom_node.export``) uses the public ``AE``.

Tests only: ``Association._reactor_checkpoint`` and ``Association._is_paused``:
``paused_reactor`` pauses an association's reactor as pynetdicom's own ``send_c_*``
methods do, so that a test can send a DIMSE message no well-behaved SCU would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

PYNETDICOM_CHECKED = ">=3.0,<3.1"
"""The pynetdicom versions this module was checked against (``pyproject.toml`` pins it)."""


@contextlib.contextmanager
def paused_reactor(assoc: Any) -> Iterator[None]:
    """Stop the association's reactor reading messages, so the caller can use its DIMSE."""
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        yield
    finally:
        assoc._reactor_checkpoint.set()
