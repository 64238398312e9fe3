"""Free space on the data folder's file system, and the low-disk watermark on receiving.

A receiver answers a C-STORE ``0xA700`` (out of resources) while the spool's file system
has less than ``receive_min_free_bytes`` free, before the disk is actually full (then a
write would fail half-way, and the database, the outputs and the logs that share the disk
would fail with it). It stores again by itself once the free space is back above the
minimum plus ``receive_free_margin_bytes``: the margin keeps a disk hovering at the limit
from flapping between the two. Free space is asked of the file system (``statvfs``) at
most once a ``probe_interval`` whatever the rate of instances, and each change between
paused and receiving is logged once by each receiver process.

No database code here: receiver processes import this module.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from dicom_node.config import Settings

log = structlog.get_logger(__name__)

PROBE_INTERVAL_SECONDS = 1.0


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (its
    nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def total_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_blocks * stats.f_frsize


class ReceiveWatermark:
    """Whether receiving is paused for lack of space. ``probe`` returns the free bytes
    (``free_bytes`` of the spool by default; tests give their own). Thread-safe: the
    associations of a receiver share one."""

    def __init__(
        self,
        min_free_bytes: int,
        margin_bytes: int,
        probe: Callable[[], int],
        *,
        probe_interval: float = PROBE_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_free_bytes = min_free_bytes
        self.margin_bytes = margin_bytes
        self._probe = probe
        self._probe_interval = probe_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next_probe = float("-inf")
        self._paused = False
        self.last_free_bytes: int | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> ReceiveWatermark:
        spool = settings.spool_dir
        return cls(
            settings.receive_min_free_bytes,
            settings.receive_free_margin_bytes,
            lambda: free_bytes(spool),
        )

    def paused(self) -> bool:
        """True while free space is short: the C-STORE is to be refused."""
        if self.min_free_bytes <= 0:
            return False
        now = self._clock()
        with self._lock:
            if now < self._next_probe:
                return self._paused
            self._next_probe = now + self._probe_interval
            try:
                free = self._probe()
            except OSError as exc:  # the write itself will say what is wrong
                log.warning("free space not known", error=str(exc))
                return self._paused
            self.last_free_bytes = free
            if not self._paused and free < self.min_free_bytes:
                self._paused = True
                log.error(
                    "receiving paused: the spool's disk is nearly full",
                    free_bytes=free,
                    receive_min_free_bytes=self.min_free_bytes,
                )
            elif self._paused and free >= self.min_free_bytes + self.margin_bytes:
                self._paused = False
                log.warning("receiving resumed: disk space is back", free_bytes=free)
            return self._paused
