"""audit_events: who did what to which object, and how it ended (issue 16, audit trail)

The value lists of the CHECK constraints are this revision's, written out (see 0005).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

CHECKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (constraint name, column, values)
    ("audit_actor_kind", "actor_kind", ("node", "dicom_peer", "api_token", "os_user")),
    (
        "audit_action",
        "action",
        (
            "association_accepted",
            "association_refused",
            "instances_stored",
            "study_completed",
            "job_ran",
            "output_exported",
            "deidentified_sent",
            "result_reidentified",
            "setting_changed",
            "rule_changed",
            "destination_changed",
            "plugin_changed",
            "retry_requested",
            "phi_read",
            "audit_read",
        ),
    ),
    ("audit_outcome", "outcome", ("success", "retrying", "failure")),
    (
        "audit_object_kind",
        "object_kind",
        (
            "association",
            "study",
            "series",
            "job",
            "export",
            "rule",
            "destination",
            "plugin",
            "setting",
            "command",
        ),
    ),
)


def _check(name: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_audit_events_{name}"))


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_kind", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("actor_address", sa.String(length=80), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("object_kind", sa.String(length=16), nullable=True),
        sa.Column("object_id", sa.String(length=128), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("details", JSON_TYPE, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        *(_check(name, column, values) for name, column, values in CHECKS),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_audit_events_study_instance_uid"), ["study_instance_uid"], unique=False
        )
        batch_op.create_index("ix_audit_events_action_at", ["action", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_action_at")
        batch_op.drop_index(batch_op.f("ix_audit_events_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_audit_events_at"))
    op.drop_table("audit_events")
