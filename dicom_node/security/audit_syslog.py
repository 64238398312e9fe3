"""The audit trail out to a collector: DICOM audit messages (PS3.15 A.5, the RFC 3881-derived
XML schema) over RFC 5424 syslog, by UDP (one datagram a message) or TCP (RFC 6587 octet
counting), as ``audit_syslog_address`` names it.

The database stays the trail of record; this is a copy for a hospital's collector (a SIEM,
an ATNA audit record repository). An ``AuditForwarder`` thread in the node reads the rows
committed since it started, by the node or by any command sharing its database, and
offers them to a ``SyslogSender``, whose one thread sends them. The node never waits for
the collector: at most ``audit_syslog_queue_size`` messages wait; when the collector is
slow or down the rest are dropped, counted, and the count is logged.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import re
import socket
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditAction, AuditActorKind, AuditEvent, AuditOutcome
from dicom_node.security.audit import event_as_dict
from processors.errors import BadInputError

log = structlog.get_logger(__name__)

ADDRESS = re.compile(r"^(udp|tcp)://\[?([^\s/\]]+)\]?:(\d{1,5})$")
# IHE ATNA: facility 10 (security/authorization), severity 5 (notice).
PRIORITY = 10 * 8 + 5
MESSAGE_ID = "IHE+RFC-3881"
APP_NAME = "dicom-node"
DROP_LOG_SECONDS = 10.0
RETRY_SECONDS = 1.0
GAP_SECONDS = 60.0
MAX_GAP = 1000  # a wider jump is a sequence moved on, not transactions in flight
READ_LIMIT = 500

Code = tuple[str, str]  # (DCM code value, code meaning)
SECURITY_ALERT: Code = ("110113", "Security Alert")
INSTANCES_ACCESSED: Code = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DICOM Instances Transferred")
SOFTWARE_CONFIGURATION: Code = ("110131", "Software Configuration")

# action -> (EventID, EventActionCode, EventTypeCode or None); codes of PS3.16 CID 400/401.
EVENTS: dict[AuditAction, tuple[Code, str, Code | None]] = {
    AuditAction.ASSOCIATION_ACCEPTED: (("110114", "User Authentication"), "E", ("110122", "Login")),
    AuditAction.ASSOCIATION_REFUSED: (SECURITY_ALERT, "E", ("110126", "Node Authentication")),
    AuditAction.INSTANCES_STORED: (INSTANCES_TRANSFERRED, "C", None),
    AuditAction.STUDY_COMPLETED: (INSTANCES_ACCESSED, "U", None),
    AuditAction.JOB_RAN: (INSTANCES_ACCESSED, "R", None),
    AuditAction.OUTPUT_EXPORTED: (INSTANCES_TRANSFERRED, "R", None),
    AuditAction.DEIDENTIFIED_SENT: (("110106", "Export"), "R", None),
    AuditAction.RESULT_REIDENTIFIED: (("110107", "Import"), "C", None),
    AuditAction.SETTING_CHANGED: (SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    AuditAction.RULE_CHANGED: (SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    AuditAction.DESTINATION_CHANGED: (SECURITY_ALERT, "E", ("110128", "Network Configuration")),
    AuditAction.PLUGIN_CHANGED: (SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    AuditAction.RETRY_REQUESTED: (INSTANCES_ACCESSED, "U", None),
    AuditAction.PHI_READ: (INSTANCES_ACCESSED, "R", None),
    AuditAction.AUDIT_READ: (("110101", "Audit Log Used"), "R", None),
    AuditAction.TOKEN_CHANGED: (
        SECURITY_ALERT,
        "E",
        ("110137", "User security Attributes Changed"),
    ),
    # A refused API request: a failed login (401) or a role too low (403).
    AuditAction.ACCESS_DENIED: (("110114", "User Authentication"), "E", ("110122", "Login")),
    AuditAction.CANCEL_REQUESTED: (INSTANCES_ACCESSED, "U", None),
    AuditAction.MODEL_CHANGED: (SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    # The PACS's storage commitment answer about instances the node sent it.
    AuditAction.STORAGE_COMMITMENT: (INSTANCES_TRANSFERRED, "R", None),
    AuditAction.DATA_PURGED: (INSTANCES_ACCESSED, "D", None),  # retention deleted the files
}
OUTCOME_INDICATORS = {
    AuditOutcome.SUCCESS: "0",
    AuditOutcome.RETRYING: "4",  # minor failure
    AuditOutcome.FAILURE: "8",  # serious failure
}


class SyslogAddressError(BadInputError):
    """``audit_syslog_address`` is not ``udp://HOST:PORT`` or ``tcp://HOST:PORT``."""


@dataclass(frozen=True)
class SyslogAddress:
    transport: str
    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> SyslogAddress:
        match = ADDRESS.match(value.strip())
        if not match or not 0 < int(match[3]) < 65536:
            raise SyslogAddressError(f"expected udp://HOST:PORT or tcp://HOST:PORT, got {value!r}")
        return cls(match[1], match[2], int(match[3]))


def _coded(parent: ElementTree.Element, tag: str, code: Code) -> None:
    ElementTree.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": "DCM", "originalText": code[1]}
    )


def audit_message(row: dict[str, Any], source_id: str) -> str:
    """One audit row (``event_as_dict``) as a DICOM audit message: the XML document."""
    event_id, action_code, type_code = EVENTS[AuditAction(row["action"])]
    message = ElementTree.Element("AuditMessage")
    identification = ElementTree.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": action_code,
            "EventDateTime": row["at"],
            "EventOutcomeIndicator": OUTCOME_INDICATORS[AuditOutcome(row["outcome"])],
        },
    )
    _coded(identification, "EventID", event_id)
    if type_code is not None:
        _coded(identification, "EventTypeCode", type_code)
    if row["reason"]:
        ElementTree.SubElement(identification, "EventOutcomeDescription").text = row["reason"]
    requestor = {"UserID": row["actor"], "UserIsRequestor": "true"}
    if row["actor_address"]:
        requestor["NetworkAccessPointID"] = row["actor_address"].rpartition(":")[0]
        requestor["NetworkAccessPointTypeCode"] = "2"  # an IP address
    if row["actor_kind"] != AuditActorKind.DICOM_PEER:
        requestor["AlternativeUserID"] = f"{row['actor_kind']}:{row['actor']}"
    ElementTree.SubElement(message, "ActiveParticipant", requestor)
    ElementTree.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if row["study_instance_uid"]:
        study = ElementTree.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row["study_instance_uid"],
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        _coded(study, "ParticipantObjectIDTypeCode", ("110180", "Study Instance UID"))
    return ElementTree.tostring(message, encoding="unicode")


def syslog_message(
    xml: str, at: dt.datetime, hostname: str | None = None, process_id: int | None = None
) -> bytes:
    """An RFC 5424 message holding ``xml`` (UTF-8, after a byte order mark)."""
    timestamp = at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-")[:255]
    process = process_id or os.getpid()
    header = f"<{PRIORITY}>1 {timestamp} {host} {APP_NAME} {process} {MESSAGE_ID} - "
    return header.encode() + "\ufeff".encode() + xml.encode()


class SyslogSender:
    """One thread that sends the messages offered to it; ``offer`` never waits."""

    def __init__(self, address: SyslogAddress, queue_size: int, timeout: float = 2.0) -> None:
        self.address = address
        self.timeout = timeout
        self.sent = 0
        self.dropped = 0
        self._logged_dropped = 0
        self._last_drop_log = 0.0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._socket: socket.socket | None = None
        self._retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, message: bytes) -> bool:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._dropped("the queue is full")
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then stop."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._close()
        if self.dropped > self._logged_dropped:
            log.warning("audit messages dropped", dropped_total=self.dropped, sent=self.sent)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            if time.monotonic() < self._retry_at:
                self._dropped("the collector was unreachable moments ago")
                continue
            try:
                self._send(message)
                self.sent += 1
            except OSError as exc:
                self._close()
                self._retry_at = time.monotonic() + RETRY_SECONDS
                self._dropped(f"cannot send to the collector: {exc.strerror or exc}")

    def _send(self, message: bytes) -> None:
        target = (self.address.host, self.address.port)
        if self.address.transport == "udp":
            if self._socket is None:
                family = socket.getaddrinfo(*target, type=socket.SOCK_DGRAM)[0][0]
                self._socket = socket.socket(family, socket.SOCK_DGRAM)
            self._socket.sendto(message, target)
            return
        if self._socket is None:
            self._socket = socket.create_connection(target, timeout=self.timeout)
        self._socket.sendall(f"{len(message)} ".encode() + message)

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _dropped(self, reason: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_SECONDS:
            self._last_drop_log = now
            self._logged_dropped = self.dropped
            log.warning("audit messages dropped", dropped_total=self.dropped, reason=reason)


class AuditForwarder:
    """A thread that offers every audit row committed after its start to a ``SyslogSender``.

    It reads the rows by id. An id taken by a transaction that commits later than a higher
    one (PostgreSQL, several writers) is looked for again for ``GAP_SECONDS``."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        sender: SyslogSender,
        source_id: str,
        interval: float = 1.0,
    ) -> None:
        self.sessions = sessions
        self.sender = sender
        self.source_id = source_id
        self.interval = interval
        self._last_id = 0
        self._gaps: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-forwarder", daemon=True)

    def start(self) -> None:
        with self.sessions() as session:
            self._last_id = session.scalar(select(func.max(AuditEvent.id))) or 0
        self.sender.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.forward_new()
        self.sender.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.forward_new()
            except Exception:  # a database hiccup must not end the forwarding
                log.exception("reading the audit trail for the collector failed")

    def forward_new(self) -> int:
        """Offer the rows committed since the last call; returns how many."""
        now = time.monotonic()
        self._gaps = {gap: seen for gap, seen in self._gaps.items() if now - seen < GAP_SECONDS}
        with self.sessions() as session:
            events = session.scalars(
                select(AuditEvent)
                .where(or_(AuditEvent.id > self._last_id, AuditEvent.id.in_(sorted(self._gaps))))
                .order_by(AuditEvent.id)
                .limit(READ_LIMIT)
            ).all()
            rows = [event_as_dict(event) for event in events]
        for row in rows:
            identifier = int(row["id"])
            self._gaps.pop(identifier, None)
            if identifier - self._last_id <= MAX_GAP:
                for missing in range(self._last_id + 1, identifier):
                    self._gaps.setdefault(missing, now)
            self._last_id = max(self._last_id, identifier)
            xml = audit_message(row, self.source_id)
            self.sender.offer(syslog_message(xml, dt.datetime.fromisoformat(row["at"])))
        return len(rows)


def start_forwarding(
    sessions: sessionmaker[Session], address: str, queue_size: int, source_id: str
) -> AuditForwarder:
    forwarder = AuditForwarder(
        sessions, SyslogSender(SyslogAddress.parse(address), queue_size), source_id
    )
    forwarder.start()
    return forwarder
