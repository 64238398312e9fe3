"""Timing shared by the benchmarks: first call and best of the repeats, synchronised."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from processors.backend import synchronize


def best_of(fn: Callable[[], Any], repeat: int, xp: Any = np) -> tuple[float, float]:
    """(first call seconds, best of ``repeat`` further calls; the first when none)."""
    started = time.perf_counter()
    fn()
    synchronize(xp)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        synchronize(xp)
        times.append(time.perf_counter() - started)
    return first, min(times) if times else first
