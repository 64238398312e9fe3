"""One bounded cache for what is loaded from files (models, ONNX sessions, manifests).

An entry is keyed on the loader and its arguments and remembers the version of every
``Path`` argument (device, inode, size, modification and change time): a file replaced on
disk, by a rename (new inode) or rewritten in place (new change time, which ``cp -p`` or
``os.utime`` cannot set back), is loaded again and its old entry dropped. Stat-ing is
cheap, so every call checks; hashing the content would read a large model on every run.
A loader that raises caches nothing.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Entries kept across all loaders; the least recently used one goes first.
MAX_ENTRIES = 64

FileVersion = tuple[int, int, int, int, int]


def file_version(path: Path) -> FileVersion:
    """What changes when ``path`` is replaced or rewritten (``OSError`` if it is missing)."""
    stat = path.stat()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


_entries: OrderedDict[Hashable, tuple[tuple[FileVersion, ...], Any]] = OrderedDict()
_lock = threading.Lock()


def cached_per_file_version(load: Callable[P, T]) -> Callable[P, T]:
    """Cache ``load``'s results per arguments and version of its ``Path`` arguments."""

    @functools.wraps(load)
    def cached(*args: P.args, **kwargs: P.kwargs) -> T:
        key = (load, args, tuple(sorted(kwargs.items())))
        versions = tuple(
            file_version(value) for value in (*args, *kwargs.values()) if isinstance(value, Path)
        )
        with _lock:
            entry = _entries.get(key)
            if entry is not None and entry[0] == versions:
                _entries.move_to_end(key)
                return entry[1]  # type: ignore[no-any-return]
            _entries.pop(key, None)  # a stale version: never kept beside the new one
        value = load(*args, **kwargs)
        with _lock:
            _entries[key] = (versions, value)
            _entries.move_to_end(key)
            while len(_entries) > MAX_ENTRIES:
                _entries.popitem(last=False)
        return value

    return cached


def entry_count() -> int:
    with _lock:
        return len(_entries)


def clear() -> None:
    """Forget every entry (for tests, and to free models' memory)."""
    with _lock:
        _entries.clear()
