"""The one cache for what is loaded from files: per file version, bounded, no failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from processors import file_cache
from processors.file_cache import cached_per_file_version


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    file_cache.clear()
    yield
    file_cache.clear()


class CountingLoader:
    def __init__(self) -> None:
        self.loads: list[Path] = []

    def __call__(self, path: Path, suffix: str = "") -> str:
        self.loads.append(path)
        return path.read_text() + suffix


def test_a_file_is_loaded_once_per_version_and_the_old_version_is_dropped(tmp_path):
    loader = CountingLoader()
    load = cached_per_file_version(loader)
    path = tmp_path / "model.bin"
    path.write_text("first")
    assert load(path) == "first" and load(path) == "first"
    assert len(loader.loads) == 1
    path.write_text("second, longer")
    assert load(path) == "second, longer"
    assert len(loader.loads) == 2
    assert file_cache.entry_count() == 1
    replacement = tmp_path / "replacement.bin"
    replacement.write_text("third")
    replacement.replace(path)  # an atomic replacement: a new inode at the same path
    assert load(path) == "third"


def test_other_arguments_are_part_of_the_key(tmp_path):
    load = cached_per_file_version(CountingLoader())
    path = tmp_path / "model.bin"
    path.write_text("x")
    assert load(path, "a") == "xa" and load(path, suffix="b") == "xb"


def test_the_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setattr(file_cache, "MAX_ENTRIES", 2)
    loader = CountingLoader()
    load = cached_per_file_version(loader)
    paths = [tmp_path / f"{n}.bin" for n in range(3)]
    for path in paths:
        path.write_text(path.name)
    load(paths[0])
    load(paths[1])
    load(paths[0])  # now the most recently used
    load(paths[2])  # evicts paths[1]
    assert file_cache.entry_count() == 2
    load(paths[0])
    load(paths[1])
    assert loader.loads == [paths[0], paths[1], paths[2], paths[1]]


def test_a_loader_that_raises_caches_nothing(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("x")
    failures = [ValueError("unreadable")]

    def flaky(path: Path) -> str:
        if failures:
            raise failures.pop()
        return path.read_text()

    load = cached_per_file_version(flaky)
    with pytest.raises(ValueError, match="unreadable"):
        load(path)
    assert load(path) == "x"


def test_a_missing_file_is_an_os_error(tmp_path):
    load = cached_per_file_version(CountingLoader())
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.bin")
