"""Storage commitment (issue 18): exports can be ``committed``; each export records the
transaction that asked the PACS to commit it, when, how often, and when the PACS
committed it; the audit trail records commitment results (``storage_commitment``).

The CHECK constraints are dropped and created again with the longer value lists (see
0005 and 0009); the lists are this revision's, written out. Downgrading turns committed
exports back into delivered ones and deletes the audit rows the narrower constraint
would refuse.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

EXPORT_STATES_0012 = ("pending", "sending", "delivered", "failed", "cancelled")
AUDIT_ACTIONS_0012 = (
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
)

CHECKS: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (table, constraint name, column, values at 0012, values at 0013)
    ("exports", "export_state", "state", EXPORT_STATES_0012, (*EXPORT_STATES_0012, "committed")),
    (
        "audit_events",
        "audit_action",
        "action",
        AUDIT_ACTIONS_0012,
        (*AUDIT_ACTIONS_0012, "storage_commitment"),
    ),
)


def _values_sql(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _replace_checks(revision_values: int) -> None:
    """Re-create the CHECKs with the values at 0012 (0) or at 0013 (1)."""
    for table, name, column, *values in CHECKS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            constraint = op.f(f"ck_{table}_{name}")
            batch_op.drop_constraint(constraint, type_="check")
            batch_op.create_check_constraint(
                constraint, f"{column} IN ({_values_sql(values[revision_values])})"
            )


def upgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("commitment_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("commitment_requests", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_exports_commitment_uid"), ["commitment_uid"], unique=False
        )
    _replace_checks(1)


def downgrade() -> None:
    op.execute(sa.text("UPDATE exports SET state = 'delivered' WHERE state = 'committed'"))
    op.execute(sa.text("DELETE FROM audit_events WHERE action = 'storage_commitment'"))
    _replace_checks(0)
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_exports_commitment_uid"))
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_requests")
        batch_op.drop_column("commitment_requested_at")
        batch_op.drop_column("commitment_uid")
