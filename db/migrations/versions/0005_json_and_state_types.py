"""JSON columns as JSON (jsonb on PostgreSQL); states and kinds checked by the database

The JSON documents that were kept as text (jobs.pipeline, params, destinations,
step_timings; outputs.params; routing_entries.definition) become JSON columns: the rows
keep their text on SQLite (its JSON type is text) and are parsed once into jsonb on
PostgreSQL. Each state or kind column stays a VARCHAR(16) and gets a named CHECK
constraint listing its values (the lowercase values the rows already hold).

Adding a state later: a migration that drops the table's ``ck_<table>_<name>``
constraint and creates it again with the new value list, inside
``op.batch_alter_table`` (SQLite rebuilds the table, PostgreSQL alters it in place).
The value lists below are this revision's, written out: a migration must not follow the
models' enums as they change.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

JSON_COLUMNS: dict[str, tuple[tuple[str, bool], ...]] = {
    # table: (column, nullable)
    "jobs": (
        ("pipeline", False),
        ("params", False),
        ("destinations", False),
        ("step_timings", True),
    ),
    "outputs": (("params", False),),
    "routing_entries": (("definition", False),),
}

STATE_CHECKS: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {
    # table: (constraint name, column, values)
    "associations": (
        ("association_status", "status", ("open", "released", "aborted", "rejected")),
    ),
    "studies": (("study_status", "status", ("receiving", "complete")),),
    "study_events": (("study_event_kind", "event", ("complete", "reopened")),),
    "outputs": (("output_kind", "kind", ("seg", "sr", "derived")),),
    "exports": (("export_state", "state", ("pending", "sending", "delivered", "failed")),),
    "jobs": (("job_state", "state", ("queued", "running", "succeeded", "failed")),),
    "routing_entries": (
        ("routing_entry_kind", "kind", ("rule", "destination")),
        ("routing_origin", "origin", ("config", "api")),
    ),
}


def _check_name(table: str, name: str) -> str:
    return f"ck_{table}_{name}"


def _values_sql(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


TABLES = sorted(STATE_CHECKS.keys() | JSON_COLUMNS.keys())


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, nullable in JSON_COLUMNS.get(table, ()):
                batch_op.alter_column(
                    column,
                    existing_type=sa.Text(),
                    type_=JSON_TYPE,
                    existing_nullable=nullable,
                    postgresql_using=f"{column}::jsonb",
                )
            for name, column, values in STATE_CHECKS.get(table, ()):
                batch_op.create_check_constraint(
                    op.f(_check_name(table, name)), f"{column} IN ({_values_sql(values)})"
                )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, _column, _values in STATE_CHECKS.get(table, ()):
                batch_op.drop_constraint(op.f(_check_name(table, name)), type_="check")
            for column, nullable in JSON_COLUMNS.get(table, ()):
                batch_op.alter_column(
                    column,
                    existing_type=JSON_TYPE,
                    type_=sa.Text(),
                    existing_nullable=nullable,
                    postgresql_using=f"{column}::text",
                )
