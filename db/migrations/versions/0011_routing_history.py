"""routing_history: every version of each routing rule and destination (issue 17), so an
administrator's change through the REST API can be looked at and reverted

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "routing_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("definition", JSON_TYPE, nullable=True),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=160), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_history")),
        sa.UniqueConstraint("kind", "name", "version", name=op.f("uq_routing_history_kind")),
        sa.CheckConstraint(
            "kind IN ('rule', 'destination')", name=op.f("ck_routing_history_routing_entry_kind")
        ),
        sa.CheckConstraint(
            "origin IN ('config', 'api')", name=op.f("ck_routing_history_routing_origin")
        ),
    )


def downgrade() -> None:
    op.drop_table("routing_history")
