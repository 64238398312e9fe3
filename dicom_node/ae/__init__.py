"""The node's DICOM upper layer as the acceptor: wire format (``wire``), negotiation
(``negotiation``), DIMSE command sets (``dimse``), one thread per association
(``association``) and the accept loop (``acceptor``)."""
