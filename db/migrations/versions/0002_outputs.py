"""outputs: the SEG, SR and derived objects produced from source series

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 08:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("source_series_uid", sa.String(length=64), nullable=False),
        sa.Column("processor_name", sa.String(length=128), nullable=False),
        sa.Column("processor_version", sa.String(length=64), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outputs")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_outputs_sop_instance_uid")),
    )
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outputs_source_series_uid"), ["source_series_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("outputs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outputs_source_series_uid"))
    op.drop_table("outputs")
