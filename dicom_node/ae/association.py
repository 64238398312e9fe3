"""One accepted connection, served by one thread, synchronously: no queues, no polling.

The thread reads a PDU, acts on it and answers before it reads the next, the way
dcm4che's receiver works: a C-STORE's dataset fragments go to its spool file as they
are read, and the response is sent as soon as the last one is filed. Timeouts (PS3.8
9.1.5's ARTIM and the node's ``network_timeout``/``dimse_timeout``) bound every wait;
any breach of the protocol aborts the association, never the process.

On the TLS port the thread first completes the TLS handshake, within ``acse_timeout``
for the whole of it; a peer that fails it (no or an untrusted certificate, an old TLS
version, not TLS at all) is refused and recorded as a rejected association.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass

import structlog
from pydicom.uid import UID

from dicom_node.ae.commitment import (
    MAX_EVENT_REPORT_BYTES,
    STORAGE_COMMITMENT_PUSH_MODEL,
    PendingTransactions,
    check_event_report,
)
from dicom_node.ae.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    MAX_COMMAND_BYTES,
    N_EVENT_REPORT_RQ,
    Command,
    decode_command,
    encode_response,
)
from dicom_node.ae.negotiation import (
    VERIFICATION,
    Negotiated,
    Negotiator,
    decode_request,
)
from dicom_node.ae.wire import (
    RELEASE_RP,
    AbortReason,
    PduReader,
    PduType,
    Pdv,
    PeerGoneError,
    ProtocolError,
    abort_pdu,
    iter_pdvs,
    p_data_pdu,
    reject_pdu,
)
from dicom_node.dimse_status import DimseStatus
from dicom_node.handlers.association import (
    REJECT_LOCAL_LIMIT_EXCEEDED,
    record_closed,
    record_established,
    record_rejected,
    rejection_reason,
)
from dicom_node.handlers.c_store import IncomingInstance, Outcome
from dicom_node.handlers.context import AssociationState, Peer, ReceiverContext

log = structlog.get_logger(__name__)

_COMMAND_LAST = 0x03
_CLOSE_WAIT_SECONDS = 2.0
"""After A-RELEASE-RP or A-ASSOCIATE-RJ, how long the requestor has to close its end."""


@dataclass
class _Message:
    """A DIMSE request in progress: its command, then (maybe) its dataset."""

    context_id: int
    command_bytes: bytearray
    command: Command | None = None
    instance: IncomingInstance | None = None
    discarded_bytes: int = 0
    event_information: bytearray | None = None
    """An N-EVENT-REPORT's dataset, kept in memory up to ``MAX_EVENT_REPORT_BYTES``."""


class Association:
    """Serves one connection from A-ASSOCIATE-RQ to release, abort or timeout."""

    def __init__(
        self,
        connection: socket.socket,
        address: tuple[str, int],
        context: ReceiverContext,
        negotiator: Negotiator,
        admit: AdmissionControl,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if tls is not None:  # no I/O yet: the handshake happens in ``serve``
            connection = tls.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        self.tls = tls
        self.connection = connection
        self.address = address
        self.context = context
        self.negotiator = negotiator
        self.admit = admit
        settings = context.settings
        self.reader = PduReader(connection, settings.network_timeout, negotiator.max_pdu_length)
        self.requested = False
        """An A-ASSOCIATE-RQ came (until then this is just a connection)."""
        self.dropped = False
        self._admitted = False
        self.state: AssociationState | None = None
        """Set once the association is established."""
        self._negotiated: Negotiated | None = None
        self._peer_max_pdu = 0
        self._message: _Message | None = None
        self._send_lock = threading.Lock()
        self._released = False

    # ------------------------------------------------------------------ lifecycle
    def serve(self) -> None:
        try:
            if self.tls is None or self._handshake():
                self._serve()
        except ProtocolError as exc:
            log.warning("association aborted: protocol error", peer=self.address[0], error=str(exc))
            self._send_quietly(abort_pdu(exc.reason))
        except PeerGoneError as exc:
            log.info("association dropped", peer=self.address[0], reason=str(exc))
        except Exception:
            log.exception("association aborted: internal error", peer=self.address[0])
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED))
        finally:
            if self._message is not None and self._message.instance is not None:
                self._message.instance.abandon()
            with contextlib.suppress(OSError):
                self.connection.close()
            if self.state is not None:  # established
                record_closed(self.context, self.state, self._released)
            if self._admitted:
                self.admit.leave(self)

    def abort(self) -> None:
        """From another thread (shutdown): send A-ABORT and unblock the serving thread.
        Over TLS no A-ABORT: one TLS connection is never written while another thread
        reads it; the peer sees the connection close."""
        if self.tls is None:
            self._send_quietly(abort_pdu(AbortReason.NOT_SPECIFIED, source=0x00))
        self._shut_down()

    def drop(self) -> None:
        """From another thread: close a connection that never asked for an association."""
        self.dropped = True
        self._shut_down()

    def _shut_down(self) -> None:
        # The TCP socket's own shutdown: SSLSocket.shutdown would drop its TLS state under
        # the thread that is reading it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.connection.sendall(data)

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.connection.settimeout(1.0)
            self._send(data)

    def _wait_for_close(self) -> None:
        with contextlib.suppress(OSError, PeerGoneError, ProtocolError):
            self.reader.read(timeout=_CLOSE_WAIT_SECONDS)

    # ------------------------------------------------------------------ association
    def _handshake(self) -> bool:
        """The TLS handshake, within ``acse_timeout`` for the whole of it (not per read).
        False when the peer went away or failed it: a failure is recorded as a rejection."""
        assert isinstance(self.connection, ssl.SSLSocket)
        self.connection.settimeout(self.context.settings.acse_timeout)
        try:
            self.connection.do_handshake()
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
            log.info("connection closed during the TLS handshake", peer=self.address[0])
            return False
        except ssl.SSLError as exc:
            peer = Peer("", "", *self.address[:2])
            record_rejected(self.context, peer, f"TLS handshake failed: {_tls_reason(exc)}")
            return False
        except (TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            log.info("TLS handshake not completed", peer=self.address[0], reason=reason)
            return False
        cipher = self.connection.cipher()
        log.debug(
            "TLS established",
            peer=self.address[0],
            version=self.connection.version(),
            cipher=cipher[0] if cipher else None,
        )
        return True

    def _serve(self) -> None:
        kind, body = self.reader.read(timeout=self.context.settings.acse_timeout)
        if kind is not PduType.ASSOCIATE_RQ:
            raise ProtocolError(f"{kind.name} before A-ASSOCIATE-RQ", AbortReason.UNEXPECTED_PDU)
        self.requested = True
        request = decode_request(body)
        peer = Peer(request.calling_ae_title, request.called_ae_title, *self.address[:2])
        verdict = rejection_reason(self.context, peer)
        if verdict is None:
            self._admitted = self.admit.enter(self)
            if not self._admitted:
                verdict = "too many associations", REJECT_LOCAL_LIMIT_EXCEEDED
        if verdict is not None:
            reason, (result, source, diagnostic) = verdict
            record_rejected(self.context, peer, reason)
            self._send(reject_pdu(result, source, diagnostic))
            self._wait_for_close()
            return
        self._negotiated = self.negotiator.negotiate(request)
        self._peer_max_pdu = request.max_pdu_length
        self._send(self._negotiated.accept_pdu)
        self.state = record_established(self.context, peer)
        self._serve_established()

    def _serve_established(self) -> None:
        settings = self.context.settings
        while True:
            timeout = settings.network_timeout if self._message is None else settings.dimse_timeout
            kind, body = self.reader.read(timeout=timeout)
            if kind is PduType.P_DATA_TF:
                for pdv in iter_pdvs(body):
                    self._pdv(pdv)
            elif kind is PduType.RELEASE_RQ:
                if self._message is not None:
                    raise ProtocolError("A-RELEASE-RQ inside a DIMSE message")
                self._send(RELEASE_RP)
                self._released = True
                self._wait_for_close()
                return
            elif kind is PduType.ABORT:
                log.info("association aborted by the peer", peer=self.address[0])
                return
            else:
                raise ProtocolError(f"unexpected {kind.name}", AbortReason.UNEXPECTED_PDU)

    # ------------------------------------------------------------------ DIMSE
    def _pdv(self, pdv: Pdv) -> None:
        assert self._negotiated is not None
        if pdv.context_id not in self._negotiated.transfer_syntaxes:
            raise ProtocolError(
                f"PDV on presentation context {pdv.context_id}, which was not accepted",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        message = self._message
        if message is not None and pdv.context_id != message.context_id:
            raise ProtocolError("a DIMSE message switched presentation context")
        if pdv.is_command:
            if message is None:
                message = self._message = _Message(pdv.context_id, bytearray())
            elif message.command is not None:
                raise ProtocolError("a command fragment inside a data set")
            message.command_bytes += pdv.data
            if len(message.command_bytes) > MAX_COMMAND_BYTES:
                raise ProtocolError("command set longer than any DIMSE command")
            if pdv.is_last:
                message.command = decode_command(bytes(message.command_bytes))
                self._command_complete(message)
            return
        if message is None or message.command is None:
            raise ProtocolError("a data set fragment without its command")
        if not message.command.has_data_set:
            raise ProtocolError("a data set for a command that announced none")
        if message.instance is not None:
            message.instance.write(pdv.data)
        elif message.event_information is not None:
            message.event_information += pdv.data
            if len(message.event_information) > MAX_EVENT_REPORT_BYTES:  # read past the rest
                message.discarded_bytes = len(message.event_information)
                message.event_information = None
        else:
            message.discarded_bytes += len(pdv.data)
        if pdv.is_last:
            self._data_set_complete(message)

    def _command_complete(self, message: _Message) -> None:
        assert message.command is not None and self._negotiated is not None
        command = message.command
        abstract_syntax = self._negotiated.abstract_syntaxes[message.context_id]
        if command.command_field == C_CANCEL_RQ:  # nothing here runs long enough to cancel
            self._message = None
        elif command.command_field == C_STORE_RQ and abstract_syntax != VERIFICATION:
            if not command.has_data_set:
                self._respond(
                    message, (DimseStatus.CANNOT_UNDERSTAND, "C-STORE without a data set")
                )
                return
            assert self.state is not None
            transfer_syntax = UID(self._negotiated.transfer_syntaxes[message.context_id])
            message.instance = IncomingInstance(self.context, self.state, command, transfer_syntax)
        elif command.command_field == C_ECHO_RQ and not command.has_data_set:
            self._respond(message, (DimseStatus.SUCCESS, None))
        elif (
            command.command_field == N_EVENT_REPORT_RQ
            and abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL
        ):
            if command.has_data_set:
                message.event_information = bytearray()
            else:
                self._event_report(message, None)
        elif not command.has_data_set:
            self._respond(message, self._unsupported(command))

    def _data_set_complete(self, message: _Message) -> None:
        assert message.command is not None
        if message.instance is not None:
            self._respond(message, message.instance.finish())
        elif message.command.command_field == N_EVENT_REPORT_RQ and (
            self._abstract_syntax(message) == STORAGE_COMMITMENT_PUSH_MODEL
        ):
            data = message.event_information
            self._event_report(message, None if data is None else bytes(data))
        else:
            self._respond(message, self._unsupported(message.command))

    def _abstract_syntax(self, message: _Message) -> str:
        assert self._negotiated is not None
        return self._negotiated.abstract_syntaxes[message.context_id]

    def _event_report(self, message: _Message, data: bytes | None) -> None:
        """A storage commitment result from a PACS: checked, passed on, answered."""
        assert message.command is not None and self._negotiated is not None
        assert self.state is not None
        command = message.command
        outcome, report = check_event_report(
            command.affected_sop_class_uid,
            command.affected_sop_instance_uid,
            command.event_type_id,
            data,
            self._negotiated.transfer_syntaxes[message.context_id],
            PendingTransactions.under(self.context.settings.data_dir),
            self.state.calling_ae_title,
        )
        if report is not None:
            self.context.index(report)
        self._respond(message, outcome)

    @staticmethod
    def _unsupported(command: Command) -> Outcome:
        log.warning("DIMSE request not supported", command_field=f"0x{command.command_field:04X}")
        return (
            DimseStatus.UNRECOGNISED_OPERATION,
            "Only C-ECHO, C-STORE and commitment reports are served",
        )

    def _respond(self, message: _Message, outcome: Outcome) -> None:
        assert message.command is not None
        self._message = None
        status, comment = outcome
        encoded = encode_response(message.command, status, comment)
        fragment = len(encoded)
        if self._peer_max_pdu:
            fragment = max(self._peer_max_pdu - 6, 1)
        pdus = []
        for start in range(0, len(encoded), fragment):
            last = start + fragment >= len(encoded)
            control = _COMMAND_LAST if last else 0x01
            pdus.append(p_data_pdu(message.context_id, control, encoded[start : start + fragment]))
        self._send(b"".join(pdus))


def _tls_reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason in words: "certificate verify failed", "unsupported protocol"."""
    if error.reason:
        return error.reason.replace("_", " ").lower()
    return str(error)


class AdmissionControl:
    """How many associations one receiver serves at once (``max_associations``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._established: set[Association] = set()

    def enter(self, association: Association) -> bool:
        with self._lock:
            if len(self._established) >= self.limit:
                return False
            self._established.add(association)
            return True

    def leave(self, association: Association) -> None:
        with self._lock:
            self._established.discard(association)

    def established(self) -> list[Association]:
        with self._lock:
            return list(self._established)
