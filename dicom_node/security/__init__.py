"""Security across the flow: TLS, de-identification, audit trail, encryption at rest."""
