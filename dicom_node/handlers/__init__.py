"""One module per DIMSE service, plus the association lifecycle; each handler returns a status."""
