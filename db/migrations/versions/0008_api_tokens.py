"""api_tokens: the REST API's bearer tokens (name, role, SHA-256 of the token) and the
audit trail's ``token_changed`` action and ``token`` object kind (issue 17)

The audit CHECK constraints are dropped and created again with the longer value lists
(see 0005); the lists are this revision's, written out. Downgrading deletes the audit
rows about tokens, which the narrower constraints would refuse, with the tokens.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 21:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

AUDIT_ACTIONS_0006 = (
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
)
AUDIT_OBJECT_KINDS_0006 = (
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
)
AUDIT_CHECKS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (constraint name, column, values at 0006, values at 0008)
    ("audit_action", "action", AUDIT_ACTIONS_0006, (*AUDIT_ACTIONS_0006, "token_changed")),
    (
        "audit_object_kind",
        "object_kind",
        AUDIT_OBJECT_KINDS_0006,
        (*AUDIT_OBJECT_KINDS_0006, "token"),
    ),
)


def _values_sql(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _replace_audit_checks(revision_values: int) -> None:
    """Re-create the audit CHECKs with the values at 0006 (0) or at 0008 (1)."""
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        for name, column, *values in AUDIT_CHECKS:
            constraint = op.f(f"ck_audit_events_{name}")
            batch_op.drop_constraint(constraint, type_="check")
            batch_op.create_check_constraint(
                constraint, f"{column} IN ({_values_sql(values[revision_values])})"
            )


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
        sa.CheckConstraint(
            "role IN ('viewer', 'operator', 'admin')", name=op.f("ck_api_tokens_token_role")
        ),
    )
    _replace_audit_checks(1)


def downgrade() -> None:
    op.execute(
        sa.text("DELETE FROM audit_events WHERE action = 'token_changed' OR object_kind = 'token'")
    )
    _replace_audit_checks(0)
    op.drop_table("api_tokens")
