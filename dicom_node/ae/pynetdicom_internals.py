"""Every place the node reaches below pynetdicom's public API, and why.

Read against pynetdicom 3.0.4; its guard test and ``tests/dicom_node/test_handlers.py``
also pass on 3.0.0, 3.0.1 and 3.0.3. ``pyproject.toml`` pins ``PYNETDICOM_CHECKED``.
``tests/dicom_node/ae/test_pynetdicom_internals.py`` fails, naming the internal, when
one of these stops being what the code here expects: re-check this module before
widening the pin.

1. ``PresentationContext._transfer_syntax`` (``CheapCopyContext``). For every
   association, ``transport.RequestHandler._create_association`` deep-copies the
   server's ``contexts``: 170 storage classes x 39 transfer syntaxes took 40 ms of each
   association's ~75 ms set-up. A context's other attributes are immutable (UIDs, ints,
   bools, None), so a copy needs only a new ``_transfer_syntax`` list.
2. ``ThreadedAssociationServer`` subclassed (``shared_listener_server``): pynetdicom
   binds its own socket; the node's receiver processes all accept on one socket opened
   by the parent (see ``dicom_node.node``). The subclass overrides the ``socketserver``
   hooks ``server_bind``, ``server_activate`` and ``get_request`` (pynetdicom's
   ``get_request`` only adds TLS wrapping, which the node does not offer yet) and swaps
   ``self.contexts`` for cheap-copy ones.
3. ``AE._servers``: ``AssociationServer.shutdown()`` removes the server from its AE's
   private ``_servers`` list, which only ``AE.start_server`` fills, and ``start_server``
   cannot take a server class. ``serve_shared_listener`` registers the server there.
4. ``pynetdicom._config.UNRESTRICTED_STORAGE_SERVICE`` (``accept_unknown_sop_classes``).
   pynetdicom 3.0 has only this module-level switch for accepting private/unknown SOP
   classes as storage: no per-AE or per-server option. It is read when a server is made,
   at every association's negotiation and for every C-STORE, so it must hold for as long
   as the server runs; a context around the server's creation cannot scope it.
   ``unrestricted_storage_service`` sets it for the time a receiver serves and restores
   the previous value after the last such receiver stops; it refuses two receivers of
   one process that want different values, and a receiver that wants it off while
   something else in the process has it on. While it is on, every pynetdicom acceptor
   in the process (not only the node's) accepts unknown SOP classes: a node process runs
   one configuration, so this only matters to code that embeds the node.
5. ``Association._reactor_checkpoint`` and ``Association._is_paused`` (tests only):
   ``paused_reactor`` pauses an association's reactor as pynetdicom's own ``send_c_*``
   methods do, so that a test can send a DIMSE message no well-behaved SCU would.

Everything else the node uses is public: ``AE``, ``make_server(server_class=...)``,
``evt`` handlers, ``assoc.acse.send_reject`` from ``EVT_REQUESTED`` (which pynetdicom
checks for after the event), ``assoc.kill()``, ``assoc.requestor``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom import AE, _config
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from processors.errors import OperationFailedError

PYNETDICOM_CHECKED = ">=3.0,<3.1"
"""The pynetdicom versions this module was checked against (``pyproject.toml`` pins it)."""

ACCEPT_BACKOFF_PER_ASSOCIATION = 0.003
"""Seconds a receiver waits per association it is serving before it accepts another."""


class CheapCopyContext(PresentationContext):
    """A presentation context whose deep copy shares everything but the transfer syntaxes."""

    @classmethod
    def copy_of(cls, context: PresentationContext) -> CheapCopyContext:
        clone = object.__new__(cls)
        clone.__dict__.update(context.__dict__)
        clone._transfer_syntax = list(context._transfer_syntax)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> CheapCopyContext:
        return CheapCopyContext.copy_of(self)


def shared_listener_server(listener: socket.socket) -> type[ThreadedAssociationServer]:
    """pynetdicom's server class, accepting on a socket other processes accept on too.

    A receiver busy with associations waits a little before accepting, so that new
    associations go to the idle ones.
    """

    class SharedListenerServer(ThreadedAssociationServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.contexts = [CheapCopyContext.copy_of(context) for context in self.contexts]

        def server_bind(self) -> None:
            if self.socket is not None:
                self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()

        def server_activate(self) -> None:
            pass

        def get_request(self) -> tuple[socket.socket, Any]:
            busy = sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)
            if busy:
                time.sleep(min(ACCEPT_BACKOFF_PER_ASSOCIATION * busy, 0.02))
            # Non-blocking: another receiver may have taken it (OSError is ignored).
            connection, address = listener.accept()
            connection.setblocking(True)
            return connection, address

    return SharedListenerServer


def serve_shared_listener(
    ae: AE, listener: socket.socket, evt_handlers: list[Any]
) -> ThreadedAssociationServer:
    """Serve ``ae`` on ``listener`` in a thread; ``server.shutdown()`` stops it."""
    server: ThreadedAssociationServer = ae.make_server(
        listener.getsockname()[:2],
        evt_handlers=evt_handlers,
        server_class=shared_listener_server(listener),
    )
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
    return server


class ProcessWideSwitchError(OperationFailedError):
    """Two users of one process need different values of a process-wide pynetdicom switch."""


class _UnrestrictedStorageService:
    """Who in this process holds ``UNRESTRICTED_STORAGE_SERVICE``, and what it was before."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.before = False

    @contextlib.contextmanager
    def held(self, enabled: bool) -> Iterator[None]:
        with self.lock:
            current = bool(_config.UNRESTRICTED_STORAGE_SERVICE)
            if current != enabled and (self.holders or not enabled):
                raise ProcessWideSwitchError(
                    "pynetdicom's process-wide UNRESTRICTED_STORAGE_SERVICE is"
                    f" {'on' if current else 'off'} for another acceptor in this process;"
                    f" this one needs it {'on' if enabled else 'off'}"
                    " (accept_unknown_sop_classes)"
                )
            if not self.holders:
                self.before = current
                _config.UNRESTRICTED_STORAGE_SERVICE = enabled
            self.holders += 1
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if not self.holders:
                    _config.UNRESTRICTED_STORAGE_SERVICE = self.before


_UNRESTRICTED_STORAGE_SERVICE = _UnrestrictedStorageService()


def unrestricted_storage_service(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """pynetdicom's switch for accepting unknown SOP classes as storage, held while inside."""
    return _UNRESTRICTED_STORAGE_SERVICE.held(enabled)


@contextlib.contextmanager
def paused_reactor(assoc: Any) -> Iterator[None]:
    """Stop the association's reactor reading messages, so the caller can use its DIMSE."""
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        yield
    finally:
        assoc._reactor_checkpoint.set()
