"""The node's DICOM client (``dicom_node.scu``): its associations' sockets."""

from __future__ import annotations

import socket

from dicom_node.config import Settings
from dicom_node.node import Node
from dicom_node.scu import _associate, _client_ae, echo


def test_associations_are_made_with_nagle_off(node: Node, settings: Settings) -> None:
    ae = _client_ae("NODELAY", timeout=10.0)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = _associate(ae, "127.0.0.1", settings.port, settings.ae_title, None)
    try:
        connection = assoc.dul.socket.socket
        assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
    assert echo("127.0.0.1", settings.port, calling_ae="NODELAY", called_ae=settings.ae_title) == 0
