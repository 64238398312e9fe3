"""pynetdicom application entity: presentation contexts, handlers, the listening server."""
