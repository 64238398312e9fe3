"""Hostile peers against the receive path, on raw sockets: a peer may lie about lengths,
stall, or send garbage. The node closes or aborts within its timeouts, never allocates
what a length field claims, keeps serving others, and loses nothing it acknowledged."""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from db.models import Instance
from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.scu import echo
from dicom_node.synthetic import generate_series
from dicom_node.testing import local_settings
from tests.dicom_node.ae.raw_peer import (
    A_ABORT,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    COMMAND_LAST,
    CT_IMAGE_STORAGE,
    DATA_LAST,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    P_DATA_TF,
    VERIFICATION,
    RawPeer,
    associate_rq,
    command_set,
    dataset_after_file_meta,
    pdu,
    pdu_types,
    peak_virtual_memory_kib,
    store_pdus,
)

ACSE_TIMEOUT = 1.0
NETWORK_TIMEOUT = 1.5
MAX_PDU = 16384
MAX_ASSOCIATIONS = 8
SLACK = 5.0  # a loaded two-core machine is slow; the bound still tells "late" from "never"
TIMER_RESOLUTION = 0.2

CONTEXTS = [
    (CT_IMAGE_STORAGE, [EXPLICIT_VR_LITTLE_ENDIAN]),
    (VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN]),
]
STORE_CONTEXT = 1
C_STORE_RQ = 0x0001
LIED_LENGTH = 0xFFFFFFF0
MAX_VIRTUAL_MEMORY_GROWTH_KIB = 1024 * 1024  # far below the 4 GiB a lying length claims


@dataclass(frozen=True)
class SentInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    data_set: bytes

    def store_pdus(self, message_id: int = 1, max_pdu: int = MAX_PDU) -> list[bytes]:
        return store_pdus(
            STORE_CONTEXT,
            CT_IMAGE_STORAGE,
            self.sop_instance_uid,
            self.data_set,
            message_id=message_id,
            max_pdu=max_pdu,
        )


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> list[SentInstance]:
    """Four CT slices of 32 KiB of pixels each: every data set spans several PDUs."""
    series = generate_series(num_slices=4, rows=128, columns=128, uid_seed="hostile-peers")
    paths = series.write(tmp_path_factory.mktemp("hostile"))
    return [
        SentInstance(
            dataset.StudyInstanceUID,
            dataset.SeriesInstanceUID,
            dataset.SOPInstanceUID,
            dataset_after_file_meta(path),
        )
        for dataset, path in zip(series.datasets, paths, strict=True)
    ]


def guarded_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "acse_timeout": ACSE_TIMEOUT,
        "network_timeout": NETWORK_TIMEOUT,
        "dimse_timeout": NETWORK_TIMEOUT,
        "max_pdu_size": MAX_PDU,
        "max_associations": MAX_ASSOCIATIONS,
    }
    values.update(overrides)
    return local_settings(tmp_path, **values)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The ``node`` fixture's settings: short timeouts, a PDU limit, few associations;
    a test changes some with ``@pytest.mark.parametrize("settings", [{...}], indirect=True)``."""
    return guarded_settings(tmp_path, **getattr(request, "param", {}))


def associated(node: Node) -> RawPeer:
    peer = RawPeer(node.settings.port)
    accepted = peer.associate(CONTEXTS)
    assert accepted.contexts.get(STORE_CONTEXT) == EXPLICIT_VR_LITTLE_ENDIAN
    return peer


def store(peer: RawPeer, instance: SentInstance, message_id: int = 1) -> int:
    return peer.store(
        STORE_CONTEXT, CT_IMAGE_STORAGE, instance.sop_instance_uid, instance.data_set, message_id
    )


def spooled(settings: Settings, instance: SentInstance) -> Path:
    return (
        settings.spool_dir
        / instance.study_instance_uid
        / instance.series_instance_uid
        / f"{instance.sop_instance_uid}.dcm"
    )


def indexed_sop_instance_uids(settings: Settings) -> set[str]:
    engine = create_engine(settings.effective_database_url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(select(Instance.sop_instance_uid)))
    finally:
        engine.dispose()


def assert_stored(settings: Settings, stored: list[SentInstance]) -> None:
    """Each instance is in the spool byte for byte and, within a few seconds, indexed."""
    for instance in stored:
        assert dataset_after_file_meta(spooled(settings, instance)) == instance.data_set
    wanted = {instance.sop_instance_uid for instance in stored}
    deadline = time.monotonic() + SLACK
    while not wanted <= indexed_sop_instance_uids(settings):
        assert time.monotonic() < deadline, "acknowledged instances were not indexed"
        time.sleep(0.05)


def assert_nothing_else_stored(
    settings: Settings, acknowledged: list[SentInstance], refused: SentInstance
) -> None:
    """Once the connection is gone, the spool holds only the acknowledged instances' files
    (no partial or temporary file of ``refused``, wherever the node keeps them in the
    spool), and ``refused`` has no index row. Call after ``assert_stored``."""
    expected = {spooled(settings, instance) for instance in acknowledged}
    deadline = time.monotonic() + NETWORK_TIMEOUT + SLACK
    while extra := {path for path in settings.spool_dir.rglob("*") if path.is_file()} - expected:
        assert time.monotonic() < deadline, f"files left in the spool: {sorted(extra)}"
        time.sleep(0.05)
    assert refused.sop_instance_uid not in indexed_sop_instance_uids(settings)


def assert_serving(settings: Settings) -> None:
    status = echo(
        "127.0.0.1", settings.port, calling_ae="ECHOSCU", called_ae=settings.ae_title, timeout=10
    )
    assert status == 0


HTTP_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: pacs.example.org:11112\r\n"
    b"User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
)
_HELLO_BODY = b"\x03\x03" + random.Random(1).randbytes(500)  # version, random, the rest
_HANDSHAKE = b"\x01" + len(_HELLO_BODY).to_bytes(3, "big") + _HELLO_BODY
TLS_CLIENT_HELLO = b"\x16\x03\x01" + len(_HANDSHAKE).to_bytes(2, "big") + _HANDSHAKE
GARBAGE = {
    "http-request": HTTP_REQUEST,
    "tls-client-hello": TLS_CLIENT_HELLO,
    "associate-rq-of-random-bytes": pdu(A_ASSOCIATE_RQ, random.Random(15).randbytes(4000)),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_instead_of_an_association_request_is_closed(node: Node, garbage: bytes) -> None:
    """A browser, a TLS client or noise on the DICOM port: closed, perhaps after an
    A-ASSOCIATE-RJ or A-ABORT, within the ACSE timeout."""
    with RawPeer(node.settings.port) as peer:
        peer.send(garbage)
        reply = peer.wait_closed(ACSE_TIMEOUT + SLACK)
    assert set(pdu_types(reply)) <= {A_ASSOCIATE_RJ, A_ABORT}
    assert_serving(node.settings)


def test_an_associate_rq_claiming_4_gib_is_not_allocated(node: Node) -> None:
    before = peak_virtual_memory_kib()
    with RawPeer(node.settings.port) as peer:
        peer.send(struct.pack(">BBI", A_ASSOCIATE_RQ, 0, LIED_LENGTH) + b"\x00\x01\x00\x00")
        peer.wait_closed(max(ACSE_TIMEOUT, NETWORK_TIMEOUT) + SLACK)
    assert peak_virtual_memory_kib() - before < MAX_VIRTUAL_MEMORY_GROWTH_KIB
    assert_serving(node.settings)


@pytest.mark.parametrize("settings", [{"max_pdu_size": 0}], indirect=True, ids=["no-limit"])
def test_a_p_data_tf_claiming_4_gib_is_not_allocated_without_a_pdu_limit(
    node: Node, instances: list[SentInstance]
) -> None:
    """max_pdu_size = 0 advertises no limit: the node must stream what arrives, not size
    a buffer by the header."""
    before = peak_virtual_memory_kib()
    instance = instances[0]
    command = command_set(C_STORE_RQ, 1, CT_IMAGE_STORAGE, instance.sop_instance_uid)
    command_pdv = struct.pack(">IBB", len(command) + 2, STORE_CONTEXT, COMMAND_LAST) + command
    data_pdv_header = struct.pack(
        ">IBB", LIED_LENGTH - len(command_pdv) - 4, STORE_CONTEXT, DATA_LAST
    )
    with associated(node) as peer:
        peer.send_unless_closed(
            struct.pack(">BBI", P_DATA_TF, 0, LIED_LENGTH)
            + command_pdv
            + data_pdv_header
            + instance.data_set
        )
        peer.wait_closed(NETWORK_TIMEOUT + SLACK)
    assert peak_virtual_memory_kib() - before < MAX_VIRTUAL_MEMORY_GROWTH_KIB
    assert_nothing_else_stored(node.settings, [], instance)
    assert_serving(node.settings)


def test_a_pdv_item_longer_than_its_pdu_is_aborted(
    node: Node, instances: list[SentInstance]
) -> None:
    first, second = instances[:2]
    command = command_set(C_STORE_RQ, 2, CT_IMAGE_STORAGE, second.sop_instance_uid)
    with associated(node) as peer:
        assert store(peer, first) == 0
        lying_item = struct.pack(">IBB", 5000, STORE_CONTEXT, COMMAND_LAST) + command
        peer.send_unless_closed(pdu(P_DATA_TF, lying_item))
        reply = peer.wait_closed(NETWORK_TIMEOUT + SLACK)
    assert pdu_types(reply) == [A_ABORT]
    assert_stored(node.settings, [first])
    assert_nothing_else_stored(node.settings, [first], second)
    assert_serving(node.settings)


def test_a_p_data_tf_over_the_advertised_maximum_is_aborted(
    node: Node, instances: list[SentInstance]
) -> None:
    first, second = instances[:2]
    with RawPeer(node.settings.port) as peer:
        assert peer.associate(CONTEXTS).max_pdu == MAX_PDU
        assert store(peer, first) == 0
        peer.send_unless_closed(b"".join(second.store_pdus(message_id=2, max_pdu=4 * MAX_PDU)))
        reply = peer.wait_closed(NETWORK_TIMEOUT + SLACK)
    assert pdu_types(reply) == [A_ABORT]  # no C-STORE response: the instance was refused
    assert_stored(node.settings, [first])
    assert_nothing_else_stored(node.settings, [first], second)
    assert_serving(node.settings)


def test_a_silent_connection_is_dropped_after_the_acse_timeout(node: Node) -> None:
    with RawPeer(node.settings.port) as peer:
        connected = time.monotonic()
        peer.wait_closed(ACSE_TIMEOUT + SLACK)
        assert time.monotonic() - connected >= ACSE_TIMEOUT - TIMER_RESOLUTION
    assert_serving(node.settings)


def test_a_stall_mid_data_set_is_dropped_and_what_was_acknowledged_stays(
    node: Node, instances: list[SentInstance]
) -> None:
    acknowledged, stalled = instances[:2], instances[2]
    with associated(node) as peer:
        for message_id, instance in enumerate(acknowledged, start=1):
            assert store(peer, instance, message_id) == 0
        for encoded in stalled.store_pdus(message_id=3)[:2]:  # the command, one fragment
            peer.send(encoded)
        stalled_at = time.monotonic()
        peer.wait_closed(NETWORK_TIMEOUT + SLACK)
        assert time.monotonic() - stalled_at >= NETWORK_TIMEOUT - TIMER_RESOLUTION
    assert_stored(node.settings, acknowledged)
    assert_nothing_else_stored(node.settings, acknowledged, stalled)
    assert_serving(node.settings)


def test_fifty_idle_connections_do_not_stop_a_sender(
    node: Node, instances: list[SentInstance]
) -> None:
    """Port scanners and half-open probes are not associations: with more of them open
    than max_associations, a modality still gets through, and they are dropped after the
    ACSE timeout."""
    port = node.settings.port
    opened = time.monotonic()
    idle = [RawPeer(port) for _ in range(50)]
    try:
        with associated(node) as sender:
            statuses = [
                store(sender, instance, message_id)
                for message_id, instance in enumerate(instances, start=1)
            ]
            sender.release()
        assert statuses == [0] * len(instances)
        assert time.monotonic() - opened < ACSE_TIMEOUT + SLACK
        deadline = opened + ACSE_TIMEOUT + SLACK
        for peer in idle:
            peer.wait_closed(max(deadline - time.monotonic(), 0.1))
    finally:
        for peer in idle:
            peer.close()
    assert_stored(node.settings, instances)


@pytest.mark.parametrize(
    "settings",
    [{"acse_timeout": 60, "max_associations": 2}],
    indirect=True,
    ids=["16-pending-allowed"],
)
def test_more_idle_connections_than_allowed_drops_the_oldest(
    node: Node, instances: list[SentInstance]
) -> None:
    """Connections without an A-ASSOCIATE-RQ are bounded (8 per association, here 16):
    beyond that the oldest is dropped at once, long before the ACSE timeout, so a flood of
    idle connections holds neither unbounded threads nor the modality off."""
    from dicom_node.ae.acceptor import PENDING_PER_ASSOCIATION

    port = node.settings.port
    allowed = PENDING_PER_ASSOCIATION * 2
    idle = [RawPeer(port) for _ in range(allowed + 4)]
    try:
        for oldest in idle[:4]:
            oldest.wait_closed(SLACK)
        with associated(node) as sender:
            assert store(sender, instances[0]) == 0
            sender.release()
        assert_stored(node.settings, instances[:1])
    finally:
        for peer in idle:
            peer.close()


# Timeouts long enough that the node does not drop the idle associations meanwhile.
@pytest.mark.parametrize(
    "settings", [{"acse_timeout": 60, "network_timeout": 60}], indirect=True, ids=["slow-drop"]
)
def test_associations_over_max_associations_are_rejected_until_one_ends(node: Node) -> None:
    port = node.settings.port
    open_associations = [associated(node) for _ in range(MAX_ASSOCIATIONS)]
    try:
        with RawPeer(port) as refused:
            refused.send(associate_rq(CONTEXTS))
            pdu_type, body = refused.read_pdu()
        assert pdu_type == A_ASSOCIATE_RJ
        # rejected-transient by the presentation layer, local limit exceeded (PS3.8 9.3.4)
        assert tuple(body[1:4]) == (2, 3, 2)
        open_associations.pop().release()
        deadline = time.monotonic() + SLACK
        while True:
            with RawPeer(port) as retry:
                retry.send(associate_rq(CONTEXTS))
                if retry.read_pdu()[0] != A_ASSOCIATE_RJ:
                    retry.release()
                    break
            assert time.monotonic() < deadline, "a freed association slot was not reused"
            time.sleep(0.1)
    finally:
        for peer in open_associations:
            peer.close()
    assert_serving(node.settings)


@pytest.mark.parametrize("cut", ["between-pdus", "inside-a-pdu"])
def test_a_store_cut_off_by_the_peer_closing_leaves_nothing(
    node: Node, instances: list[SentInstance], cut: str
) -> None:
    first, cut_short = instances[:2]
    with associated(node) as peer:
        assert store(peer, first) == 0
        command, fragment, *_ = cut_short.store_pdus(message_id=2)
        peer.send(command + (fragment if cut == "between-pdus" else fragment[: len(fragment) // 2]))
    assert_stored(node.settings, [first])
    assert_nothing_else_stored(node.settings, [first], cut_short)
    assert_serving(node.settings)


def test_an_unknown_pdu_type_is_aborted(node: Node, instances: list[SentInstance]) -> None:
    with associated(node) as peer:
        assert store(peer, instances[0]) == 0
        peer.send(pdu(0x09, b"\x00" * 10))
        reply = peer.wait_closed(NETWORK_TIMEOUT + SLACK)
    assert pdu_types(reply) == [A_ABORT]
    assert_stored(node.settings, [instances[0]])
    assert_serving(node.settings)
