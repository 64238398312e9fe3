"""The REST API's foundations: bearer tokens and the roles they carry (``tokens``)."""
