"""Tables for what the node received and what became of it.

The spool on disk is the source of truth; these rows are its index plus the history
(associations, study state changes) that the files cannot tell.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.enums import AssociationStatus as AssociationStatus
from db.enums import AuditAction as AuditAction
from db.enums import AuditActorKind as AuditActorKind
from db.enums import AuditObjectKind as AuditObjectKind
from db.enums import AuditOutcome as AuditOutcome
from db.enums import ExportState as ExportState
from db.enums import JobState as JobState
from db.enums import ModelKind as ModelKind
from db.enums import TokenRole as TokenRole

UID = String(64)
AE_TITLE = String(16)

JSON_DOCUMENT = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
"""JSON (binary ``jsonb`` on PostgreSQL); Python ``None`` is SQL NULL, not JSON ``null``."""

STATE_LENGTH = 16


def state_type(states: type[StrEnum], name: str, length: int = STATE_LENGTH) -> Enum:
    """A column of ``states`` members, stored as their (lowercase) values.

    A VARCHAR with a named CHECK constraint rather than a PostgreSQL ENUM type: the same
    schema on SQLite and PostgreSQL, and a new state is an ordinary transactional migration
    (drop and re-create the CHECK), where ``ALTER TYPE ... ADD VALUE`` cannot be undone
    and its value cannot be used in the transaction that adds it.
    """
    return Enum(
        states,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=length,
        values_callable=lambda members: [member.value for member in members],
    )


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A stored time with its offset: SQLite hands back naive datetimes, and every stored
    time is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def in_utc(value: dt.datetime) -> dt.datetime:
    """A moment given with any offset (or none: UTC) as UTC, to compare with stored times:
    SQLite compares them as text, without their offsets."""
    return as_utc(value).astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyStatus(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    called_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[bool] = mapped_column(Boolean)
    reject_reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[AssociationStatus] = mapped_column(
        state_type(AssociationStatus, "association_status")
    )
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    status: Mapped[StudyStatus] = mapped_column(
        state_type(StudyStatus, "study_status"), default=StudyStatus.RECEIVING
    )
    study_date: Mapped[str | None] = mapped_column(String(8))
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Its spool files were deleted by retention (``dicom_node.retention``); cleared when an
    # instance of it is received again.
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_status_last_received_at", "status", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    association_id: Mapped[str | None] = mapped_column(ForeignKey("associations.id"), index=True)
    # Its file was deleted by retention; cleared when it is received again.
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class StudyEventKind(StrEnum):
    COMPLETE = "complete"
    REOPENED = "reopened"


class StudyEvent(Base):
    """A study's state change; the routing stage consumes the unconsumed ``complete`` events."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    event: Mapped[StudyEventKind] = mapped_column(state_type(StudyEventKind, "study_event_kind"))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    num_instances: Mapped[int] = mapped_column(Integer)
    consumed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class PluginState(Base):
    """An admin's choice for one processor plugin: enabled or not, and a pinned version."""

    __tablename__ = "plugin_state"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    pinned_version: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OutputKind(StrEnum):
    SEG = "seg"
    SR = "sr"
    DERIVED = "derived"


class Output(Base):
    """A DICOM object the node produced from a source series (SEG, SR, derived image)."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[OutputKind] = mapped_column(state_type(OutputKind, "output_kind"))
    path: Mapped[str] = mapped_column(Text)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    source_series_uid: Mapped[str] = mapped_column(UID, index=True)
    processor_name: Mapped[str] = mapped_column(String(128))
    processor_version: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON_DOCUMENT)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    # Its file was deleted by retention; cleared when a job writes it again.
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Export(Base):
    """One instance to be sent to one destination; one row per (destination, instance).

    ``host``, ``port`` and ``ae_title`` record where it was (last) sent; delivery looks the
    destination up by name, so a corrected destination applies to the rows still pending.
    """

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(128))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    ae_title: Mapped[str] = mapped_column(AE_TITLE)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[ExportState] = mapped_column(
        state_type(ExportState, "export_state"), default=ExportState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    output_id: Mapped[int | None] = mapped_column(ForeignKey("outputs.id"), index=True)
    # The node sending it while ``sending``: a restart recovers only its own rows.
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    # Storage commitment (issue 18): the transaction that asked the PACS to commit this
    # delivered instance, when it was (last) asked, how often for this delivery, and when
    # the PACS said it committed it (state ``committed``).
    commitment_uid: Mapped[str | None] = mapped_column(UID, index=True)
    commitment_requested_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    commitment_requests: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    committed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint(
            "destination", "sop_instance_uid", name="uq_exports_destination_sop_instance_uid"
        ),
        Index("ix_exports_state_next_attempt_at", "state", "next_attempt_at"),
    )


class Job(Base):
    """One rule's pipeline on one series. State changes go through ``dicom_node.jobs.state``.

    ``pipeline``, ``params`` and ``destinations`` are copies of the rule as it was when the
    job was made, so editing a rule does not change a job already queued.
    ``step_timings`` is a list of ``{"step", "seconds"}``; ``claimed_by`` the node
    that runs it and ``worker`` the executor's worker that ran it.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    rule_name: Mapped[str] = mapped_column(String(128))
    pipeline: Mapped[list[str]] = mapped_column(JSON_DOCUMENT)
    params: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON_DOCUMENT)
    destinations: Mapped[list[str]] = mapped_column(JSON_DOCUMENT)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[JobState] = mapped_column(
        state_type(JobState, "job_state"), default=JobState.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    step_timings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON_DOCUMENT)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    worker: Mapped[str | None] = mapped_column(String(255))
    num_outputs: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The study completed again while the job ran: queue it again when this run ends.
    rerun_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        UniqueConstraint("series_id", "rule_name", name="uq_jobs_series_id_rule_name"),
        Index("ix_jobs_state_not_before", "state", "not_before"),
    )


class RoutingEntryKind(StrEnum):
    RULE = "rule"
    DESTINATION = "destination"


class RoutingOrigin(StrEnum):
    CONFIG = "config"
    API = "api"


class RoutingEntry(Base):
    """A routing rule or destination, as the JSON document ``dicom_node.config`` validates.

    ``origin`` is ``config`` for entries copied from the configuration file at start (the
    file wins for those names) and ``api`` for entries an administrator made.
    """

    __tablename__ = "routing_entries"

    kind: Mapped[RoutingEntryKind] = mapped_column(
        state_type(RoutingEntryKind, "routing_entry_kind"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON_DOCUMENT)
    origin: Mapped[RoutingOrigin] = mapped_column(state_type(RoutingOrigin, "routing_origin"))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Pseudonym(Base):
    """What re-identifying one de-identified study needs, sealed with the node's key
    (``dicom_node.security.pseudonyms``): its UIDs, original patient and study attributes
    and date shift. Only the pseudonymous study UID, which results come back under, is
    in clear."""

    __tablename__ = "pseudonyms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonymous_study_uid: Mapped[str] = mapped_column(UID, unique=True)
    destination: Mapped[str] = mapped_column(String(128))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# -- audit trail (issue 16, section 3) -------------------------------------------------------


AUDIT_ENUM_LENGTH = 32


class AuditEvent(Base):
    """Who did what to which object, and how it ended: written in the transaction of the
    change it records (``dicom_node.security.audit.record``). UIDs, names of rules,
    plugins and destinations, counts: never a patient's name, ID or birth date."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor_kind: Mapped[AuditActorKind] = mapped_column(
        state_type(AuditActorKind, "audit_actor_kind")
    )
    actor: Mapped[str] = mapped_column(String(128))
    actor_address: Mapped[str | None] = mapped_column(String(80))
    action: Mapped[AuditAction] = mapped_column(
        state_type(AuditAction, "audit_action", AUDIT_ENUM_LENGTH)
    )
    outcome: Mapped[AuditOutcome] = mapped_column(state_type(AuditOutcome, "audit_outcome"))
    reason: Mapped[str | None] = mapped_column(Text)
    object_kind: Mapped[AuditObjectKind | None] = mapped_column(
        state_type(AuditObjectKind, "audit_object_kind")
    )
    object_id: Mapped[str | None] = mapped_column(String(128))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    count: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON_DOCUMENT)

    __table_args__ = (Index("ix_audit_events_action_at", "action", "at"),)


# -- REST API tokens (issue 17) --------------------------------------------------------------


class ApiToken(Base):
    """A bearer token of the REST API (``dicom_node.api.tokens``): its name, its role and
    the SHA-256 of the token, never the token itself. ``created_by`` is the actor, as
    ``<kind>:<name>`` (``os_user:alice``, ``api_token:ops``)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[TokenRole] = mapped_column(state_type(TokenRole, "token_role"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(160))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


# -- routing history (issue 17): every version of each rule and destination ------------------


class RoutingHistory(Base):
    """One version of a rule or destination (``dicom_node.routing_store``): the definition
    it had after a change (None once deleted), what the change was, who made it and where
    it came from. Versions count from 1 per (kind, name); a revert writes a new version."""

    __tablename__ = "routing_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[RoutingEntryKind] = mapped_column(
        state_type(RoutingEntryKind, "routing_entry_kind")
    )
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    change: Mapped[str] = mapped_column(String(16))
    definition: Mapped[dict[str, Any] | None] = mapped_column(JSON_DOCUMENT)
    origin: Mapped[RoutingOrigin] = mapped_column(state_type(RoutingOrigin, "routing_origin"))
    actor: Mapped[str] = mapped_column(String(160))
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("kind", "name", "version"),)


# -- models registered by admins (issue 17) --------------------------------------------------


class RegisteredModel(Base):
    """One version of a model an admin uploaded (``dicom_node.model_registry``): the file
    is ``<data_dir>/models/sha256/<file_sha256><suffix>``, content-addressed, so that a
    version never changes under a running job; ``manifest`` is the manifest as stored
    (its ``model`` pointing at that file); ``evaluation`` what ``dicom-node models
    evaluate`` measured. A rule's step ``model:<name>`` runs the enabled version."""

    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[ModelKind] = mapped_column(state_type(ModelKind, "model_kind"))
    file_sha256: Mapped[str] = mapped_column(String(64), index=True)
    file_size: Mapped[int] = mapped_column(BigInteger)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON_DOCUMENT)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON_DOCUMENT)
    evaluated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    uploaded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    uploaded_by: Mapped[str] = mapped_column(String(160))

    __table_args__ = (UniqueConstraint("name", "version"),)


# -- nodes sharing the database (issue 18): heartbeats and leases -----------------------------


class NodeHeartbeat(Base):
    """A node that runs on this database (``dicom_node.nodes``): it writes ``heartbeat_at``
    every few seconds; one silent past the lease has its running jobs and its exports
    being sent taken over by the others. ``stopped_at``: when it stopped cleanly (None
    while it runs, or when it died)."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
