"""The admin surface's states (issue 17): jobs and exports can be ``cancelled``; the audit
trail records refused API requests (``access_denied``), cancellations
(``cancel_requested``) and model changes (``model_changed``), with the object kinds
``model`` and ``request`` (an API request that was refused: method and path).

Each CHECK constraint is dropped and created again with the longer value list (see
0005); the lists are this revision's, written out. Downgrading turns cancelled jobs and
exports into failed ones and deletes the audit rows the narrower constraints would refuse.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

AUDIT_ACTIONS_0008 = (
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
)
NEW_AUDIT_ACTIONS = ("access_denied", "cancel_requested", "model_changed")
AUDIT_OBJECT_KINDS_0008 = (
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
    "token",
)
NEW_AUDIT_OBJECT_KINDS = ("model", "request")
JOB_STATES_0005 = ("queued", "running", "succeeded", "failed")
EXPORT_STATES_0005 = ("pending", "sending", "delivered", "failed")

CHECKS: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (table, constraint name, column, values at 0008, values at 0009)
    ("jobs", "job_state", "state", JOB_STATES_0005, (*JOB_STATES_0005, "cancelled")),
    ("exports", "export_state", "state", EXPORT_STATES_0005, (*EXPORT_STATES_0005, "cancelled")),
    (
        "audit_events",
        "audit_action",
        "action",
        AUDIT_ACTIONS_0008,
        (*AUDIT_ACTIONS_0008, *NEW_AUDIT_ACTIONS),
    ),
    (
        "audit_events",
        "audit_object_kind",
        "object_kind",
        AUDIT_OBJECT_KINDS_0008,
        (*AUDIT_OBJECT_KINDS_0008, *NEW_AUDIT_OBJECT_KINDS),
    ),
)


def _values_sql(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def _replace_checks(revision_values: int) -> None:
    """Re-create the CHECKs with the values at 0008 (0) or at 0009 (1)."""
    for table in dict.fromkeys(check[0] for check in CHECKS):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for check_table, name, column, *values in CHECKS:
                if check_table != table:
                    continue
                constraint = op.f(f"ck_{table}_{name}")
                batch_op.drop_constraint(constraint, type_="check")
                batch_op.create_check_constraint(
                    constraint, f"{column} IN ({_values_sql(values[revision_values])})"
                )


def upgrade() -> None:
    _replace_checks(1)


def downgrade() -> None:
    op.execute(sa.text("UPDATE jobs SET state = 'failed' WHERE state = 'cancelled'"))
    op.execute(sa.text("UPDATE exports SET state = 'failed' WHERE state = 'cancelled'"))
    actions = _values_sql(NEW_AUDIT_ACTIONS)
    kinds = _values_sql(NEW_AUDIT_OBJECT_KINDS)
    op.execute(
        sa.text(f"DELETE FROM audit_events WHERE action IN ({actions}) OR object_kind IN ({kinds})")  # noqa: S608
    )
    _replace_checks(0)
