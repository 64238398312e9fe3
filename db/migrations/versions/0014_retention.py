"""Retention (issue 18): ``purged_at`` on studies, instances and outputs (their files were
deleted by ``dicom_node.retention``; the rows stay for the audit trail and the UIDs), and
the audit action ``data_purged``.

The audit action's CHECK is dropped and created again with the longer list (see 0009 and 0013);
downgrading deletes the ``data_purged`` rows the narrower constraint would refuse.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 01:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

AUDIT_ACTIONS_0013 = (
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
    "token_changed",
    "access_denied",
    "cancel_requested",
    "model_changed",
    "storage_commitment",
)
NEW_AUDIT_ACTION = "data_purged"
PURGED_TABLES = ("studies", "instances", "outputs")


def _values_sql(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _audit_actions(values: tuple[str, ...]) -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        constraint = op.f("ck_audit_events_audit_action")
        batch_op.drop_constraint(constraint, type_="check")
        batch_op.create_check_constraint(constraint, f"action IN ({_values_sql(values)})")


def upgrade() -> None:
    for table in PURGED_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    _audit_actions((*AUDIT_ACTIONS_0013, NEW_AUDIT_ACTION))


def downgrade() -> None:
    op.execute(sa.text(f"DELETE FROM audit_events WHERE action = '{NEW_AUDIT_ACTION}'"))  # noqa: S608
    _audit_actions(AUDIT_ACTIONS_0013)
    for table in PURGED_TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("purged_at")
