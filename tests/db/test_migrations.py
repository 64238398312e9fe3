from __future__ import annotations

import datetime as dt
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, Enum, MetaData, create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.enums import ModelKind
from db.models import (
    ApiToken,
    Association,
    AssociationStatus,
    AuditAction,
    AuditActorKind,
    AuditEvent,
    AuditObjectKind,
    AuditOutcome,
    Base,
    Export,
    ExportState,
    Job,
    JobState,
    Output,
    OutputKind,
    RegisteredModel,
    RoutingEntry,
    RoutingEntryKind,
    RoutingHistory,
    RoutingOrigin,
    Study,
    StudyEvent,
    StudyEventKind,
    StudyStatus,
    TokenRole,
)
from db.session import downgrade, make_engine, upgrade

AT = dt.datetime(2026, 11, 1, 8, 0, tzinfo=dt.UTC)
UI = "1.2.826.0.1.3680043.10.1433"

ROWS_AT_0004: dict[str, list[dict[str, Any]]] = {
    # Rows as the code of revision 0004 wrote them: JSON as text, states as strings.
    "associations": [
        {
            "id": "a-1",
            "calling_ae_title": "CT1",
            "called_ae_title": "DICOMNODE",
            "peer_address": "127.0.0.1",
            "peer_port": 5000,
            "accepted": True,
            "status": "released",
            "started_at": AT,
            "instances_received": 1,
            "instances_failed": 0,
            "bytes_received": 10,
        }
    ],
    "studies": [
        {
            "id": 1,
            "study_instance_uid": f"{UI}.1",
            "status": "complete",
            "first_received_at": AT,
            "last_received_at": AT,
            "completed_at": AT,
        }
    ],
    "series": [{"id": 1, "series_instance_uid": f"{UI}.1.1", "study_id": 1, "modality": "CT"}],
    "instances": [
        {
            "id": 1,
            "sop_instance_uid": f"{UI}.1.1.1",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "series_id": 1,
            "path": "/spool/1.dcm",
            "size_bytes": 10,
            "received_at": AT,
            "association_id": "a-1",
        }
    ],
    "study_events": [
        {"id": 1, "study_id": 1, "event": "reopened", "at": AT, "num_instances": 0},
        {"id": 2, "study_id": 1, "event": "complete", "at": AT, "num_instances": 1},
    ],
    "jobs": [
        {
            "id": 1,
            "study_id": 1,
            "series_id": 1,
            "series_instance_uid": f"{UI}.1.1",
            "rule_name": "ct",
            "pipeline": '["gaussian", "threshold_segment"]',
            "params": '{"gaussian": {"sigma_mm": 2.0}}',
            "destinations": '["pacs"]',
            "priority": 0,
            "state": "succeeded",
            "attempts": 1,
            "max_attempts": 3,
            "not_before": AT,
            "step_timings": '[{"step": "load", "seconds": 0.25}]',
            "num_outputs": 1,
            "created_at": AT,
        },
        {
            "id": 2,
            "study_id": 1,
            "series_id": 1,
            "series_instance_uid": f"{UI}.1.1",
            "rule_name": "all",
            "pipeline": '["median"]',
            "params": "{}",
            "destinations": "[]",
            "priority": 5,
            "state": "queued",
            "attempts": 0,
            "max_attempts": 3,
            "not_before": AT,
            "step_timings": None,
            "num_outputs": 0,
            "created_at": AT,
        },
    ],
    "outputs": [
        {
            "id": 1,
            "sop_instance_uid": f"{UI}.2.1.1",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
            "kind": "seg",
            "path": "/outputs/seg.dcm",
            "series_instance_uid": f"{UI}.2.1",
            "source_series_uid": f"{UI}.1.1",
            "processor_name": "threshold_segment",
            "processor_version": "1.0.0",
            "params": '{"lower":-500,"preset":"body"}',
            "created_at": AT,
            "job_id": 1,
        }
    ],
    "exports": [
        {
            "id": 1,
            "destination": "pacs",
            "host": "pacs.example.org",
            "port": 104,
            "ae_title": "PACS",
            "sop_instance_uid": f"{UI}.2.1.1",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
            "path": "/outputs/seg.dcm",
            "state": "delivered",
            "attempts": 1,
            "max_attempts": 10,
            "next_attempt_at": AT,
            "created_at": AT,
            "delivered_at": AT,
            "output_id": 1,
        }
    ],
    "routing_entries": [
        {
            "kind": "rule",
            "name": "ct",
            "position": 0,
            "definition": '{"name": "ct", "pipeline": ["gaussian"]}',
            "origin": "config",
            "updated_at": AT,
        },
        {
            "kind": "destination",
            "name": "pacs",
            "position": 0,
            "definition": '{"name": "pacs", "host": "pacs.example.org", "port": 104}',
            "origin": "api",
            "updated_at": AT,
        },
    ],
}


def an_audit_event() -> AuditEvent:
    return AuditEvent(
        at=AT,
        actor_kind=AuditActorKind.DICOM_PEER,
        actor="CT1",
        actor_address="127.0.0.1:5000",
        action=AuditAction.INSTANCES_STORED,
        outcome=AuditOutcome.SUCCESS,
        object_kind=AuditObjectKind.ASSOCIATION,
        object_id="a-1",
        study_instance_uid=f"{UI}.1",
        series_instance_uid=f"{UI}.1.1",
        count=3,
        details={"bytes": 30},
    )


def an_api_token() -> ApiToken:
    return ApiToken(
        name="ops",
        role=TokenRole.OPERATOR,
        token_sha256="0" * 64,
        created_at=AT,
        created_by="os_user:alice",
    )


def a_routing_version() -> RoutingHistory:
    return RoutingHistory(
        kind=RoutingEntryKind.RULE,
        name="ct",
        version=1,
        change="created",
        definition={"name": "ct", "pipeline": ["gaussian"]},
        origin=RoutingOrigin.API,
        actor="api_token:admin",
        changed_at=AT,
    )


def a_registered_model() -> RegisteredModel:
    return RegisteredModel(
        name="lungs",
        version="1",
        kind=ModelKind.SEGMENTATION,
        file_sha256="0" * 64,
        file_size=1,
        manifest={},
        uploaded_at=AT,
        uploaded_by="os_user:alice",
    )


def a_token_audit_event() -> AuditEvent:
    return AuditEvent(
        at=AT,
        actor_kind=AuditActorKind.OS_USER,
        actor="alice",
        action=AuditAction.TOKEN_CHANGED,
        outcome=AuditOutcome.SUCCESS,
        object_kind=AuditObjectKind.TOKEN,
        object_id="ops",
    )


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    return names


def database_at_0004_with_rows(url: str) -> None:
    upgrade(url, "0004")
    engine = create_engine(url)
    tables = MetaData()
    with engine.begin() as connection:
        tables.reflect(connection)
        for name, rows in ROWS_AT_0004.items():  # in foreign-key order
            connection.execute(tables.tables[name].insert(), rows)
    engine.dispose()


def state_columns() -> list[tuple[str, str, Enum]]:
    """(table, column, type) of every column the models keep as an enum."""
    columns = [
        (table.name, column.name, column.type)
        for table in Base.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, Enum)
    ]
    assert ("jobs", "state") in {(table, column) for table, column, _ in columns}
    return columns


def json_type_sql(dialect: str, column: str) -> str:
    return f"jsonb_typeof({column})" if dialect == "postgresql" else f"json_type({column})"


def test_upgrade_from_nothing_then_models_match_migrations(empty_database: str) -> None:
    upgrade(empty_database)
    upgrade(empty_database)  # a second upgrade is a no-op
    engine = make_engine(empty_database)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert differences == [], "models changed without a migration: run alembic revision"
    assert {"associations", "studies", "series", "instances", "study_events", "jobs"} <= tables


def test_sqlite_database_is_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_rows_written_at_0004_read_back_as_documents_and_states(empty_database: str) -> None:
    database_at_0004_with_rows(empty_database)
    upgrade(empty_database)
    engine = make_engine(empty_database)
    with Session(engine) as session:
        first, second = session.scalars(select(Job).order_by(Job.id))
        assert (first.pipeline, first.params, first.destinations) == (
            ["gaussian", "threshold_segment"],
            {"gaussian": {"sigma_mm": 2.0}},
            ["pacs"],
        )
        assert first.step_timings == [{"step": "load", "seconds": 0.25}]
        assert (second.params, second.destinations, second.step_timings) == ({}, [], None)
        assert (first.state, second.state) == (JobState.SUCCEEDED, JobState.QUEUED)
        assert isinstance(first.state, JobState)
        output = session.scalars(select(Output)).one()
        assert (output.kind, output.params) == (OutputKind.SEG, {"lower": -500, "preset": "body"})
        assert session.scalars(select(Export.state)).one() is ExportState.DELIVERED
        assert session.scalars(select(Study.status)).one() is StudyStatus.COMPLETE
        assert session.scalars(select(Association.status)).one() is AssociationStatus.RELEASED
        assert list(session.scalars(select(StudyEvent.event).order_by(StudyEvent.id))) == [
            StudyEventKind.REOPENED,
            StudyEventKind.COMPLETE,
        ]
        entries = {
            (entry.kind, entry.origin): entry.definition
            for entry in session.scalars(select(RoutingEntry))
        }
        assert entries == {
            (RoutingEntryKind.RULE, RoutingOrigin.CONFIG): {"name": "ct", "pipeline": ["gaussian"]},
            (RoutingEntryKind.DESTINATION, RoutingOrigin.API): {
                "name": "pacs",
                "host": "pacs.example.org",
                "port": 104,
            },
        }
        # Stored as JSON documents (not JSON strings holding the old text), NULL kept NULL.
        dialect = engine.dialect.name
        stored = session.execute(
            text(
                f"SELECT {json_type_sql(dialect, 'pipeline')}, "
                f"{json_type_sql(dialect, 'params')}, step_timings IS NULL FROM jobs ORDER BY id"
            )
        ).all()
        assert [tuple(row) for row in stored] == [
            ("array", "object", False),
            ("array", "object", True),
        ]
    engine.dispose()


def test_states_outside_their_enum_are_refused_by_the_database(empty_database: str) -> None:
    database_at_0004_with_rows(empty_database)
    upgrade(empty_database)
    engine = make_engine(empty_database)
    with Session(engine) as session, session.begin():
        session.add_all(
            [an_audit_event(), an_api_token(), a_routing_version(), a_registered_model()]
        )
    accepted = []
    for table, column, _type in state_columns():
        with engine.connect() as connection:
            try:
                connection.execute(text(f"UPDATE {table} SET {column} = 'bogus'"))
            except IntegrityError:
                continue
            finally:
                connection.rollback()
            accepted.append(f"{table}.{column}")
    engine.dispose()
    assert accepted == []


def test_each_check_constraint_lists_exactly_its_enums_values(empty_database: str) -> None:
    """A state added to a StrEnum needs a migration that widens the CHECK: this says so."""
    upgrade(empty_database)
    engine = make_engine(empty_database)
    inspector = inspect(engine)
    for table, column, enum_type in state_columns():
        constraints = {
            check["name"]: check["sqltext"] for check in inspector.get_check_constraints(table)
        }
        name = f"ck_{table}_{enum_type.name}"
        assert name in constraints, f"{table}.{column} has no CHECK constraint"
        assert enum_type.enum_class is not None and issubclass(enum_type.enum_class, StrEnum)
        listed = set(re.findall(r"'([^']*)'", constraints[name]))
        assert listed == {member.value for member in enum_type.enum_class}, name
    engine.dispose()


def test_downgrade_to_0004_gives_back_the_text(empty_database: str) -> None:
    database_at_0004_with_rows(empty_database)
    upgrade(empty_database)
    downgrade(empty_database, "0004")
    engine: Engine = create_engine(empty_database)
    with engine.connect() as connection:
        pipeline, step_timings = connection.execute(
            text("SELECT pipeline, step_timings FROM jobs ORDER BY id")
        ).first() or (None, None)
        assert isinstance(pipeline, str) and '"gaussian"' in pipeline
        assert isinstance(step_timings, str) and '"load"' in step_timings
        connection.execute(text("UPDATE jobs SET state = 'anything'"))  # no CHECK any more
    engine.dispose()
    upgrade(empty_database)


def test_0006_adds_the_audit_trail_and_its_downgrade_removes_it(empty_database: str) -> None:
    database_at_0004_with_rows(empty_database)
    upgrade(empty_database, "0005")
    assert "audit_events" not in table_names(empty_database)
    upgrade(empty_database)
    engine = make_engine(empty_database)
    with Session(engine) as session, session.begin():
        session.add(an_audit_event())
    with Session(engine) as session:
        stored = session.scalars(select(AuditEvent)).one()
        assert (stored.action, stored.actor_kind, stored.outcome, stored.object_kind) == (
            AuditAction.INSTANCES_STORED,
            AuditActorKind.DICOM_PEER,
            AuditOutcome.SUCCESS,
            AuditObjectKind.ASSOCIATION,
        )
        assert (stored.count, stored.details, stored.reason) == (3, {"bytes": 30}, None)
    engine.dispose()
    downgrade(empty_database, "0005")
    assert "audit_events" not in table_names(empty_database)
    assert "jobs" in table_names(empty_database)
    upgrade(empty_database)
    assert "audit_events" in table_names(empty_database)


def test_0008_adds_the_tokens_and_their_audit_values_and_its_downgrade_removes_them(
    empty_database: str,
) -> None:
    upgrade(empty_database, "0007")
    assert "api_tokens" not in table_names(empty_database)
    upgrade(empty_database)
    engine = make_engine(empty_database)
    with Session(engine) as session, session.begin():
        session.add_all([an_api_token(), a_token_audit_event(), an_audit_event()])
    with Session(engine) as session:
        token = session.scalars(select(ApiToken)).one()
        assert (token.name, token.role, token.revoked_at) == ("ops", TokenRole.OPERATOR, None)
        assert session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all() == [
            AuditAction.TOKEN_CHANGED,
            AuditAction.INSTANCES_STORED,
        ]
    engine.dispose()
    downgrade(empty_database, "0007")
    assert "api_tokens" not in table_names(empty_database)
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        actions = connection.execute(text("SELECT action FROM audit_events")).scalars().all()
        assert actions == ["instances_stored"]  # the token's row went with the tokens
        with pytest.raises(IntegrityError):
            connection.execute(text("UPDATE audit_events SET action = 'token_changed'"))
        connection.rollback()
    engine.dispose()
    upgrade(empty_database)
    assert "api_tokens" in table_names(empty_database)
