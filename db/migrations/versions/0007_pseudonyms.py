"""pseudonyms: the sealed map that re-identifies what comes back from a de-identifying
destination (one row per de-identified study)

Revision ID: 0007
Revises: 0005 (the lead chains it after 0006 at merge)
Create Date: 2026-11-30 20:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pseudonyms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pseudonymous_study_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pseudonyms")),
        sa.UniqueConstraint(
            "pseudonymous_study_uid", name=op.f("uq_pseudonyms_pseudonymous_study_uid")
        ),
    )


def downgrade() -> None:
    op.drop_table("pseudonyms")
