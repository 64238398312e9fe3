"""A receiver process's entry point (``python -m dicom_node.receiver_process``): it ties
its life to the node's before it imports anything slow, then runs
``dicom_node.receiver.main``.

The receiver's imports take seconds on a busy machine while it already holds the node's
listening socket (inherited). Armed only after them, a node killed during its start-up
left its receivers holding the DICOM port until they had finished importing and noticed,
and the node started again meanwhile could not bind the port ("Address already in use").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def tie_to_parent(parent: int) -> bool:
    """Be killed when the node dies (Linux: ``PR_SET_PDEATHSIG``); False if it already has
    (the death signal came too late to be sent)."""
    # Not on Linux: the receiver polls its parent instead.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == parent


def main(argv: list[str]) -> None:
    parent = int(argv[argv.index("--parent-pid") + 1])
    if not tie_to_parent(parent):
        return
    from dicom_node.receiver import main as run_receiver

    run_receiver(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
