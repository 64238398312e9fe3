"""A bounded fuzz run against the receive path (``bench/fuzz.py`` runs 10,000 cases).

After every case the node answers a C-ECHO on a new association, has written nothing
outside its data folder, keeps in its spool only files named by valid UIDs, and answered
a bad data set with a failure status (or an abort) rather than a success.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.testing import local_settings
from tests.dicom_node.ae.fuzz_cases import (
    CT_IMAGE_STORAGE,
    EXPLICIT_CONTEXT,
    PDU_SEQUENCES,
    HostileDataSet,
    PduStep,
    echo_status,
    element,
    files_outside,
    hostile_data_sets,
    is_valid_uid,
    send_hostile_data_set,
    send_pdu_sequence,
)
from tests.dicom_node.ae.raw_peer import peak_virtual_memory_kib

CI_EXAMPLES = 120
SUCCESS = 0x0000
FAILURE_CLASSES = (0xA700, 0xA900, 0xC000)
MAX_VIRTUAL_MEMORY_GROWTH_KIB = 1024 * 1024

FUZZ_SETTINGS = settings(
    max_examples=CI_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def fuzz_settings(fuzz_root: Path) -> Settings:
    return local_settings(
        fuzz_root,
        acse_timeout=2.0,
        network_timeout=2.0,
        dimse_timeout=2.0,
        max_pdu_size=16384,
        max_associations=8,
    )


@pytest.fixture(scope="module")
def fuzz_node(fuzz_settings: Settings) -> Iterator[Node]:
    running = Node(fuzz_settings)
    running.start()
    try:
        yield running
    finally:
        running.stop(grace_seconds=5)


def assert_node_whole(node: Node, root: Path) -> None:
    assert echo_status(node.settings.port) == SUCCESS
    assert files_outside(root, node.settings.data_dir) == []
    spool = node.settings.spool_dir
    for path in spool.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(spool).parts
        assert len(parts) == 3, f"a spool file outside <study>/<series>/: {parts}"
        assert parts[2].endswith(".dcm")
        assert all(is_valid_uid(part) for part in (parts[0], parts[1], parts[2][:-4])), parts


def test_hostile_pdu_sequences_leave_the_node_serving(fuzz_node: Node, fuzz_root: Path) -> None:
    before = peak_virtual_memory_kib()

    @FUZZ_SETTINGS
    @given(steps=PDU_SEQUENCES)
    def case(steps: list[PduStep]) -> None:
        send_pdu_sequence(fuzz_node.settings.port, steps)
        assert_node_whole(fuzz_node, fuzz_root)

    case()
    assert peak_virtual_memory_kib() - before < MAX_VIRTUAL_MEMORY_GROWTH_KIB


def test_hostile_data_sets_get_failure_statuses(fuzz_node: Node, fuzz_root: Path) -> None:
    before = peak_virtual_memory_kib()

    @FUZZ_SETTINGS
    @given(data_set=hostile_data_sets())
    def case(data_set: HostileDataSet) -> None:
        status, _ = send_hostile_data_set(fuzz_node.settings.port, data_set)
        if status == SUCCESS:
            assert is_valid_uid(data_set.sop_instance_uid), data_set
            assert list(fuzz_node.settings.spool_dir.rglob(f"{data_set.sop_instance_uid}.dcm"))
        elif status is not None:
            assert status & 0xFF00 in FAILURE_CLASSES or status & 0xF000 == 0xC000, hex(status)
        assert_node_whole(fuzz_node, fuzz_root)

    case()
    assert peak_virtual_memory_kib() - before < MAX_VIRTUAL_MEMORY_GROWTH_KIB


@pytest.mark.parametrize("uid", ["../../../../etc/passwd", "1.2.3/../../x", "/tmp/evil", ".."])
def test_path_like_uids_are_refused(fuzz_node: Node, fuzz_root: Path, uid: str) -> None:
    """Spelled out apart from the random cases: a UID that names a path never becomes one."""
    data_set = b"".join(
        [
            element(0x0008, 0x0016, b"UI", CT_IMAGE_STORAGE.encode()),
            element(0x0008, 0x0018, b"UI", uid.encode()),
            element(0x0020, 0x000D, b"UI", uid.encode()),
            element(0x0020, 0x000E, b"UI", uid.encode()),
        ]
    )
    case = HostileDataSet(uid, data_set, EXPLICIT_CONTEXT, "uids")
    status, _ = send_hostile_data_set(fuzz_node.settings.port, case)
    assert status is not None and status & 0xF000 == 0xC000, status
    assert_node_whole(fuzz_node, fuzz_root)
