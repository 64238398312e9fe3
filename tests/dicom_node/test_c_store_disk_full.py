"""The spool's file system fills up: the node answers 0xA700, keeps every instance it
acknowledged whole, leaves no partial file, and stores again by itself once space returns.

The spool is a small tmpfs mounted for the test (the test runs as root, as CI does); the
index database is elsewhere, as it is when the database is PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings
from tests.dicom_node.ae.raw_peer import (
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
    RawPeer,
    dataset_after_file_meta,
)
from tests.dicom_node.small_fs import mounted_tmpfs

CONTEXTS = [
    (CT_IMAGE_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN]),
    (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
]
OUT_OF_RESOURCES = 0xA700
TMPFS_BYTES = 3 * 1024 * 1024
SLICE_COUNT = 60  # 60 x 128 KiB: twice what the tmpfs holds


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "small-fs", TMPFS_BYTES) as mount_point:
        yield mount_point


@pytest.fixture
def full_settings(tmp_path: Path, small_file_system: Path) -> Settings:
    return local_settings(
        tmp_path,
        data_dir=small_file_system / "data",
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        receive_min_free_bytes=0,  # no low-disk watermark: the writes themselves fail
    )


@pytest.fixture
def slices(tmp_path: Path) -> list[tuple[str, bytes]]:
    series = generate_series(num_slices=SLICE_COUNT, rows=256, columns=256, uid_seed="disk-full")
    paths = series.write(tmp_path / "slices")
    return [
        (dataset.SOPInstanceUID, dataset_after_file_meta(path))
        for dataset, path in zip(series.datasets, paths, strict=True)
    ]


def spool_files(settings: Settings) -> set[Path]:
    return {path for path in settings.spool_dir.rglob("*") if path.is_file()}


def test_a_full_spool_answers_out_of_resources_and_recovers(
    full_settings: Settings, small_file_system: Path, slices: list[tuple[str, bytes]]
) -> None:
    # Space that the operator can free later, taken before the node starts.
    filler = small_file_system / "filler"
    filler.write_bytes(os.urandom(TMPFS_BYTES // 3))
    node = Node(full_settings)
    node.start()
    try:
        acknowledged: list[tuple[str, bytes]] = []
        refused: list[tuple[str, bytes]] = []
        with RawPeer(full_settings.port) as peer:
            peer.associate(CONTEXTS)
            for message_id, (uid, data_set) in enumerate(slices, start=1):
                status = peer.store(1, CT_IMAGE_STORAGE, uid, data_set, message_id)
                assert status in (0, OUT_OF_RESOURCES), hex(status)
                (acknowledged if status == 0 else refused).append((uid, data_set))
                if len(refused) == 3:
                    break
            assert refused, "the file system never filled up"
            assert peer.echo(3, message_id=999) == 0  # the association is still usable

            # Every acknowledged instance is whole, nothing else is there.
            stored = {path.stem: path for path in spool_files(full_settings)}
            assert set(stored) == {uid for uid, _ in acknowledged}
            for uid, data_set in acknowledged:
                assert dataset_after_file_meta(stored[uid]) == data_set
                assert dcmread(stored[uid]).SOPInstanceUID == uid

            # Space comes back: the same association stores the refused instances.
            filler.unlink()
            for message_id, (uid, data_set) in enumerate(refused, start=1000):
                assert peer.store(1, CT_IMAGE_STORAGE, uid, data_set, message_id) == 0
            peer.release()
        stored = {path.stem: path for path in spool_files(full_settings)}
        assert set(stored) == {uid for uid, _ in acknowledged + refused}
    finally:
        node.stop(grace_seconds=5)
