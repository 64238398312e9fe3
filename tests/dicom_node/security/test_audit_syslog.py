"""Audit rows out to a syslog collector as DICOM audit messages: UDP and TCP listeners stand
in for the collector; a collector that is down never holds the node up."""

from __future__ import annotations

import datetime as dt
import re
import socket
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from dicom_node.config import ConfigError, load_settings
from dicom_node.scu import echo
from dicom_node.security.audit import Actor, AuditAction, AuditOutcome, record
from dicom_node.security.audit_syslog import (
    AuditForwarder,
    SyslogAddress,
    SyslogAddressError,
    SyslogSender,
    audit_message,
)
from dicom_node.testing import free_port, running_node

STUDY = "1.2.826.0.1.3680043.10.1433.5"
HEADER = re.compile(rb"^<85>1 (\S+) (\S+) dicom-node (\d+) IHE\+RFC-3881 - \xef\xbb\xbf")


def add_events(sessions: sessionmaker[Session]) -> None:
    """Two committed rows, and one in a transaction that rolls back."""
    with sessions.begin() as session:
        record(
            session,
            action=AuditAction.INSTANCES_STORED,
            actor=Actor.dicom_peer("CT1", "10.0.0.5", 4100),
            study_instance_uid=STUDY,
            count=3,
        )
        record(
            session,
            action=AuditAction.ASSOCIATION_REFUSED,
            actor=Actor.dicom_peer("INTRUDER", "10.0.0.9", 4200),
            outcome=AuditOutcome.FAILURE,
            reason="called AE title not ours",
        )
    with pytest.raises(RuntimeError), sessions.begin() as session:
        record(session, action=AuditAction.PHI_READ, actor=Actor.os_user())
        raise RuntimeError("rolled back")


def parsed(message: bytes) -> ElementTree.Element:
    match = HEADER.match(message)
    assert match is not None, message[:120]
    dt.datetime.fromisoformat(match[1].decode())  # an RFC 3339 time stamp
    return ElementTree.fromstring(message[match.end() :].decode())


def coded(element: ElementTree.Element, path: str) -> tuple[str | None, str | None]:
    found = element.find(path)
    assert found is not None, path
    return found.get("csd-code"), found.get("codeSystemName")


@pytest.fixture
def udp_collector() -> Iterator[tuple[socket.socket, str]]:
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    yield collector, f"udp://127.0.0.1:{collector.getsockname()[1]}"
    collector.close()


def test_committed_rows_reach_a_udp_collector_as_dicom_audit_messages(
    sessions: sessionmaker[Session],
    udp_collector: tuple[socket.socket, str],
) -> None:
    collector, address = udp_collector
    with sessions.begin() as session:  # before the forwarder starts: not sent
        record(session, action=AuditAction.AUDIT_READ, actor=Actor.os_user())
    sender = SyslogSender(SyslogAddress.parse(address), queue_size=10)
    forwarder = AuditForwarder(sessions, sender, "NODE-1", interval=0.05)
    forwarder.start()
    try:
        add_events(sessions)
        stored, refused = (parsed(collector.recv(65535)) for _ in range(2))
    finally:
        forwarder.stop()
    assert coded(stored, "EventIdentification/EventID") == ("110104", "DCM")
    identification = stored.find("EventIdentification")
    assert identification is not None
    assert (identification.get("EventActionCode"), identification.get("EventOutcomeIndicator")) == (
        "C",
        "0",
    )
    participant = stored.find("ActiveParticipant")
    assert participant is not None
    assert (participant.get("UserID"), participant.get("NetworkAccessPointID")) == (
        "CT1",
        "10.0.0.5",
    )
    source = stored.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "NODE-1"
    study = stored.find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == STUDY
    assert coded(study, "ParticipantObjectIDTypeCode") == ("110180", "DCM")
    assert [child.tag for child in stored] == [  # the schema's order
        "EventIdentification",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
    ]
    assert coded(refused, "EventIdentification/EventID") == ("110113", "DCM")
    assert coded(refused, "EventIdentification/EventTypeCode") == ("110126", "DCM")
    description = refused.find("EventIdentification/EventOutcomeDescription")
    assert description is not None and description.text == "called AE title not ours"
    collector.settimeout(0.3)
    with pytest.raises(TimeoutError):  # neither the earlier row nor the rolled back one
        collector.recv(65535)
    assert (sender.sent, sender.dropped) == (2, 0)


def test_a_tcp_collector_gets_octet_counted_frames(sessions: sessionmaker[Session]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def collect() -> None:
        connection, _ = listener.accept()
        with connection:
            while chunk := connection.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=collect)
    thread.start()
    sender = SyslogSender(SyslogAddress.parse(f"tcp://127.0.0.1:{listener.getsockname()[1]}"), 10)
    forwarder = AuditForwarder(sessions, sender, "NODE-1", interval=0.05)
    forwarder.start()
    add_events(sessions)
    deadline = time.monotonic() + 10
    while sender.sent < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    forwarder.stop()
    thread.join(10)
    listener.close()
    frames = []
    rest = bytes(received)
    while rest:
        length, _, rest = rest.partition(b" ")
        frames.append(rest[: int(length)])
        rest = rest[int(length) :]
    assert [coded(parsed(frame), "EventIdentification/EventID")[0] for frame in frames] == [
        "110104",
        "110113",
    ]


def test_a_collector_that_is_down_costs_dropped_messages_never_a_wait(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        for _ in range(200):
            record(session, action=AuditAction.PHI_READ, actor=Actor.os_user())
    sender = SyslogSender(SyslogAddress.parse(f"tcp://127.0.0.1:{free_port()}"), 5)
    forwarder = AuditForwarder(sessions, sender, "NODE-1", interval=3600)
    forwarder._last_id = 0  # as if the rows came after the start
    sender.start()
    with capture_logs() as logs:
        started = time.monotonic()
        assert forwarder.forward_new() == 200
        offering = time.monotonic() - started
        sender.stop()
    assert offering < 2.0
    assert sender.sent == 0 and sender.dropped == 200
    drops = [entry for entry in logs if entry["event"] == "audit messages dropped"]
    assert drops and drops[-1]["dropped_total"] == 200


def test_every_action_has_its_dicom_event_and_addresses_are_checked() -> None:
    at = dt.datetime(2026, 11, 30, tzinfo=dt.UTC).isoformat()
    for action in AuditAction:
        row = {
            "action": action,
            "at": at,
            "outcome": "retrying",
            "reason": None,
            "actor": "ops",
            "actor_kind": "api_token",
            "actor_address": None,
            "study_instance_uid": None,
        }
        message = ElementTree.fromstring(audit_message(row, "NODE-1"))
        identification = message.find("EventIdentification")
        assert identification is not None and identification.get("EventOutcomeIndicator") == "4"
    assert SyslogAddress.parse("tcp://[::1]:6514") == SyslogAddress("tcp", "::1", 6514)
    for bad in ("syslog.example.org:514", "udp://host", "http://host:514", "udp://host:99999"):
        with pytest.raises(SyslogAddressError):
            SyslogAddress.parse(bad)
    with pytest.raises(ConfigError, match="audit_syslog_address"):
        load_settings(None, audit_syslog_address="siem:514")


def test_a_served_node_sends_its_trail_to_the_collector_named_by_the_setting(
    tmp_path: Path, udp_collector: tuple[socket.socket, str]
) -> None:
    collector, address = udp_collector
    env = {"DICOM_NODE_AUDIT_SYSLOG_ADDRESS": address, "DICOM_NODE_RECEIVER_PROCESSES": "1"}
    with running_node(tmp_path / "data", env=env) as node:
        echo("127.0.0.1", node.port, calling_ae="ECHOER", called_ae=node.ae_title)
        accepted = parsed(collector.recv(65535))
    assert coded(accepted, "EventIdentification/EventID") == ("110114", "DCM")
    participant = accepted.find("ActiveParticipant")
    assert participant is not None and participant.get("UserID") == "ECHOER"
