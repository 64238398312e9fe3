"""registered_models: the models admins upload (issue 17): name, version, kind, the
SHA-256 and size of the content-addressed file under ``<data_dir>/models``, the manifest,
the evaluation, enabled, who uploaded it and when.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("manifest", JSON_DOCUMENT, nullable=False),
        sa.Column("evaluation", JSON_DOCUMENT, nullable=True),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uploaded_by", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registered_models")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_registered_models_name")),
        sa.CheckConstraint(
            "kind IN ('segmentation', 'classification', 'regression')",
            name=op.f("ck_registered_models_model_kind"),
        ),
    )
    op.create_index(op.f("ix_registered_models_file_sha256"), "registered_models", ["file_sha256"])


def downgrade() -> None:
    op.drop_index(op.f("ix_registered_models_file_sha256"), table_name="registered_models")
    op.drop_table("registered_models")
