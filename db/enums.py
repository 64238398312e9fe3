"""Column values that code without SQLAlchemy needs too: a receiver process imports none,
and the command line defers it until a command needs the database."""

from __future__ import annotations

from enum import StrEnum


class AssociationStatus(StrEnum):
    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by an operator (REST API); never run again unless retried


class ExportState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by an operator (REST API); not sent unless retried
    COMMITTED = "committed"  # delivered, and the PACS took responsibility (storage commitment)


# -- audit trail (issue 16, section 3): the CLI filters on actions before it loads the models


class AuditAction(StrEnum):
    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REFUSED = "association_refused"
    INSTANCES_STORED = "instances_stored"
    STUDY_COMPLETED = "study_completed"
    JOB_RAN = "job_ran"
    OUTPUT_EXPORTED = "output_exported"
    DEIDENTIFIED_SENT = "deidentified_sent"
    RESULT_REIDENTIFIED = "result_reidentified"
    SETTING_CHANGED = "setting_changed"
    RULE_CHANGED = "rule_changed"
    DESTINATION_CHANGED = "destination_changed"
    PLUGIN_CHANGED = "plugin_changed"
    RETRY_REQUESTED = "retry_requested"  # a job or an export queued again by hand
    PHI_READ = "phi_read"
    AUDIT_READ = "audit_read"
    TOKEN_CHANGED = "token_changed"  # noqa: S105 (an API token created or revoked)
    ACCESS_DENIED = "access_denied"  # an API request without a valid token, or a role too low
    CANCEL_REQUESTED = "cancel_requested"  # a job or an export cancelled by hand
    MODEL_CHANGED = "model_changed"  # a model uploaded, evaluated, enabled or removed
    STORAGE_COMMITMENT = "storage_commitment"  # the PACS committed an export, or did not
    DATA_PURGED = "data_purged"  # a study's spool files or a job's outputs deleted by retention


class AuditActorKind(StrEnum):
    NODE = "node"  # the node's own stages (indexer, assembler, dispatcher, exporter)
    DICOM_PEER = "dicom_peer"  # a calling AE title, with its address
    API_TOKEN = "api_token"  # noqa: S105 (the REST API token's name, not a secret)
    OS_USER = "os_user"  # whoever ran the command line


class AuditOutcome(StrEnum):
    SUCCESS = "success"
    RETRYING = "retrying"  # failed; tried again later
    FAILURE = "failure"


class AuditObjectKind(StrEnum):
    ASSOCIATION = "association"
    STUDY = "study"
    SERIES = "series"
    JOB = "job"
    EXPORT = "export"
    RULE = "rule"
    DESTINATION = "destination"
    PLUGIN = "plugin"
    SETTING = "setting"
    COMMAND = "command"
    TOKEN = "token"  # noqa: S105 (an API token's name, not a secret)
    MODEL = "model"
    REQUEST = "request"  # an API request (method and path): refused, or reading patient data


class TokenRole(StrEnum):
    """What an API token may do, each role including the ones before it."""

    VIEWER = "viewer"  # reads
    OPERATOR = "operator"  # also retries and cancels jobs and exports
    ADMIN = "admin"  # also changes rules, destinations, plugins, models and tokens


class ModelKind(StrEnum):
    """What a model registered by an admin does (``dicom_node.model_registry``)."""

    SEGMENTATION = "segmentation"  # an ONNX network: a label map -> DICOM SEG
    CLASSIFICATION = "classification"  # a scikit-learn classifier (.skops) -> SR
    REGRESSION = "regression"  # a scikit-learn regressor (.skops) -> SR
