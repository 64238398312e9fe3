"""/api/v1/rules and /api/v1/destinations: validated as node.toml is, stored for the
dispatcher, versioned, audited, reverted; the file's entries are the file's; the rule tester
answers on the studies already received."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.enums import TokenRole
from db.models import Job, RoutingEntry, RoutingEntryKind, RoutingOrigin
from db.session import make_engine, make_sessionmaker, upgrade
from db.testing import writer_gets_in_first
from dicom_node.api.context import ApiContext
from dicom_node.api.testing import ApiHarness, api_harness, settings_for
from dicom_node.api.tokens import create_token
from dicom_node.assembler import complete_quiet_studies
from dicom_node.jobs import dispatcher as dispatcher_module
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import InlineExecutor
from dicom_node.jobs.worker import JobResult, JobSpec
from dicom_node.node import Node
from dicom_node.routing import route
from dicom_node.routing_store import load_routing, sync_from_settings
from dicom_node.security.audit import Actor, AuditAction
from dicom_node.storage import Spool
from dicom_node.testing import free_port
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import PACS, add_series

ADMIN = TokenRole.ADMIN
LATER_THAN_RECEIVED = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
PATIENT_NAME = "Phantom^Synthetic"  # what dicom_node.synthetic writes
CT_RULE: dict[str, Any] = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}


def send(api: ApiHarness, method: str, path: str, role: TokenRole = ADMIN, **kw: Any) -> Any:
    return api.client.request(method, f"/api/v1{path}", headers=api.headers(role), **kw)


def created(api: ApiHarness, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = send(api, "POST", path, json=body)
    assert response.status_code == 201, response.text
    document: dict[str, Any] = response.json()
    return document


def index_series(api: ApiHarness, number: int, **fields: Any) -> str:
    spool = Spool(api.context.settings.spool_dir, fsync=False)
    return add_series(spool, api.context.sessions, number=number, **fields)


def error_locs(response: Any) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [error["loc"] for error in response.json()["detail"]]


# -- create, read, validate -----------------------------------------------------------------


def test_create_read_update_delete_a_rule_each_audited_with_its_version(api: ApiHarness) -> None:
    created(api, "/destinations", PACS)
    rule = created(api, "/rules", {**CT_RULE, "destinations": ["pacs"]})
    assert rule["origin"] == "api" and rule["version"] == 1 and rule["enabled"] is True
    assert rule["definition"]["min_instances"] == 1  # the defaults are shown
    assert [r["name"] for r in send(api, "GET", "/rules", TokenRole.VIEWER).json()] == ["ct"]
    assert send(api, "GET", "/destinations/pacs", TokenRole.VIEWER).json()["used_by"] == ["ct"]

    changed = {**CT_RULE, "destinations": ["pacs"], "priority": 7}
    response = send(api, "PUT", "/rules/ct", json=changed)
    assert response.status_code == 200 and response.json()["version"] == 2
    assert send(api, "GET", "/rules/ct").json()["definition"]["priority"] == 7
    assert send(api, "DELETE", "/rules/ct").json() == {"name": "ct", "deleted": True, "version": 3}
    assert send(api, "GET", "/rules/ct").status_code == 404

    rows = audit_rows(api.context.sessions, AuditAction.RULE_CHANGED)
    assert [(r["object_id"], r["details"]["change"], r["details"]["version"]) for r in rows] == [
        ("ct", "created", 1),
        ("ct", "updated", 2),
        ("ct", "deleted", 3),
    ]
    assert {r["actor"] for r in rows} == {"admin"}
    assert len(audit_rows(api.context.sessions, AuditAction.DESTINATION_CHANGED)) == 1


BAD_RULES: list[tuple[dict[str, Any], list[Any], str]] = [
    ({"name": "x"}, ["body", "pipeline"], "Field required"),
    ({**CT_RULE, "min_instances": 0}, ["body", "min_instances"], "greater than or equal"),
    ({**CT_RULE, "name": "bad name"}, ["body", "name"], "pattern"),
    ({**CT_RULE, "colour": "red"}, ["body", "colour"], "Extra inputs"),
    ({**CT_RULE, "match": {"NoSuchKeyword": "x"}}, ["body"], "unknown DICOM keyword"),
    ({**CT_RULE, "destinations": ["nowhere"]}, ["body", "destinations", 0], "'nowhere'"),
    ({**CT_RULE, "pipeline": ["gaussian", "gausian"]}, ["body", "pipeline", 1], "'gausian'"),
    (
        {**CT_RULE, "params": {"gaussian": {"sigma_mm": -1}}},
        ["body", "params", "gaussian"],
        "sigma_mm",
    ),
]


def test_a_bad_rule_is_a_422_naming_the_field(api: ApiHarness) -> None:
    for body, loc, words in BAD_RULES:
        response = send(api, "POST", "/rules", json=body)
        assert error_locs(response) == [loc], body
        assert words in response.json()["detail"][0]["msg"], body
    with api.context.sessions() as session:
        assert session.scalars(select(RoutingEntry)).all() == []
    assert audit_rows(api.context.sessions, AuditAction.RULE_CHANGED) == []


def test_a_rule_naming_a_disabled_processor_is_refused(api: ApiHarness) -> None:
    assert send(api, "POST", "/plugins/gaussian/disable").status_code == 200
    response = send(api, "POST", "/rules", json=CT_RULE)
    assert error_locs(response) == [["body", "pipeline", 0]]
    assert "disabled" in response.json()["detail"][0]["msg"]


def test_a_2d_rule_naming_a_volume_only_processor_is_a_422_with_the_reason(
    api: ApiHarness,
) -> None:
    mammograms = {"name": "mg", "match": {"Modality": "MG"}, "pipeline": ["clahe", "unet"]}
    response = send(api, "POST", "/rules", json=mammograms)
    assert error_locs(response) == [["body", "pipeline", 1]]
    message = response.json()["detail"][0]["msg"]
    assert "'unet' takes no 2-D images" in message and "MG (mammography)" in message
    # Tomosynthesis is MG too but a volume: a rule naming its SOP class may take unet.
    tomosynthesis = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.13.1.3"}
    volumes = {**mammograms, "match": {"Modality": "MG", **tomosynthesis}}
    created(api, "/rules", volumes)
    response = send(api, "PUT", "/rules/mg", json=mammograms)  # nor by a change
    assert error_locs(response) == [["body", "pipeline", 1]]


def test_bad_destinations_are_422_naming_the_field(api: ApiHarness) -> None:
    no_address = {"name": "pacs", "ae_title": "PACS"}
    assert "host and port" in send(api, "POST", "/destinations", json=no_address).text
    deid = {**PACS, "deidentify": "basic"}  # the harness has no spool_encryption_key_file
    assert error_locs(send(api, "POST", "/destinations", json=deid)) == [["body", "deidentify"]]
    created(api, "/destinations", PACS)
    research = {**PACS, "name": "research", "deidentify": "basic", "results_to": ["nowhere"]}
    response = send(api, "POST", "/destinations", json={**research, "deidentify": None})
    assert response.status_code == 422  # results_to needs deidentify, as in the file


def test_taken_names_and_destinations_in_use_are_409(api: ApiHarness) -> None:
    created(api, "/destinations", PACS)
    created(api, "/rules", {**CT_RULE, "destinations": ["pacs"]})
    assert send(api, "POST", "/rules", json=CT_RULE).status_code == 409
    response = send(api, "DELETE", "/destinations/pacs")
    assert response.status_code == 409 and "'ct'" not in response.text
    assert "ct" in response.json()["detail"]
    renamed = send(api, "PUT", "/rules/ct", json={**CT_RULE, "name": "other"})
    assert error_locs(renamed) == [["body", "name"]]
    assert (
        send(api, "PUT", "/rules/nothing", json={**CT_RULE, "name": "nothing"}).status_code == 404
    )


def test_another_admin_creating_the_same_rule_meanwhile_is_a_409(api: ApiHarness) -> None:
    def other_admin(session: Session) -> None:
        session.add(
            RoutingEntry(
                kind=RoutingEntryKind.RULE,
                name="ct",
                definition=CT_RULE,
                origin=RoutingOrigin.API,
                updated_at=LATER_THAN_RECEIVED,
            )
        )

    with writer_gets_in_first(api.engine, "routing_entries", other_admin) as race:
        response = send(api, "POST", "/rules", json={**CT_RULE, "priority": 3})
    assert race.happened
    assert response.status_code == 409 and "meanwhile" in response.json()["detail"]
    assert send(api, "GET", "/rules/ct").json()["definition"]["priority"] == 0
    assert audit_rows(api.context.sessions, AuditAction.RULE_CHANGED) == []


def test_viewers_and_operators_read_but_only_admins_change(api: ApiHarness) -> None:
    created(api, "/rules", CT_RULE)
    for role in (TokenRole.VIEWER, TokenRole.OPERATOR):
        assert send(api, "GET", "/rules/ct", role).status_code == 200
        assert send(api, "GET", "/rules/ct/history", role).status_code == 200
        assert send(api, "POST", "/rules", role, json={**CT_RULE, "name": "x"}).status_code == 403
        assert send(api, "PUT", "/rules/ct", role, json=CT_RULE).status_code == 403
        assert send(api, "POST", "/rules/ct/disable", role).status_code == 403
        assert send(api, "POST", "/rules/ct/revert?version=1", role).status_code == 403
        assert send(api, "DELETE", "/rules/ct", role).status_code == 403
        assert send(api, "POST", "/destinations", role, json=PACS).status_code == 403
    assert send(api, "GET", "/rules/ct").json()["version"] == 1


# -- the configuration file's entries --------------------------------------------------------


def test_the_files_entries_can_be_switched_off_until_the_next_start_but_not_edited(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, destinations=[PACS], rules=[CT_RULE])
    with api_harness(settings) as api:
        with api.context.sessions.begin() as session:
            sync_from_settings(session, settings)  # what the node does at start
        rule = send(api, "GET", "/rules/ct").json()
        assert rule["origin"] == "config" and rule["version"] == 1
        for method, path in [("PUT", "/rules/ct"), ("DELETE", "/rules/ct")]:
            response = send(api, method, path, json=CT_RULE if method == "PUT" else None)
            assert response.status_code == 409
            assert "configuration file" in response.json()["detail"]
        assert send(api, "DELETE", "/destinations/pacs").status_code == 409
        disabled = send(api, "POST", "/rules/ct/disable").json()
        assert disabled["enabled"] is False and "next start" in disabled["note"]
        with api.context.sessions.begin() as session:
            sync_from_settings(session, settings)  # the next start
        assert send(api, "GET", "/rules/ct").json()["enabled"] is True
        changes = [v["change"] for v in send(api, "GET", "/rules/ct/history").json()]
        assert changes == ["added", "disabled", "changed"]


# -- enable, disable, history, revert ----------------------------------------------------------


def test_disable_enable_history_and_revert(api: ApiHarness) -> None:
    created(api, "/rules", CT_RULE)
    send(api, "PUT", "/rules/ct", json={**CT_RULE, "match": {"Modality": "MR"}})
    assert send(api, "POST", "/rules/ct/disable").json()["enabled"] is False
    assert send(api, "POST", "/rules/ct/disable").json()["version"] == 3  # no change
    with api.context.sessions() as session:
        [rule] = load_routing(session, api.context.settings).rules
    assert rule.enabled is False  # what the dispatcher reads: it skips the rule

    history = send(api, "GET", "/rules/ct/history", TokenRole.VIEWER).json()
    assert [(v["version"], v["change"]) for v in history] == [
        (1, "created"),
        (2, "updated"),
        (3, "disabled"),
    ]
    assert history[0]["actor"] == "api_token:admin"
    assert history[1]["definition"]["match"] == {"Modality": "MR"}

    reverted = send(api, "POST", "/rules/ct/revert?version=1").json()
    assert reverted["version"] == 4 and reverted["enabled"] is True
    assert reverted["definition"]["match"] == {"Modality": "CT"}
    assert send(api, "POST", "/rules/ct/revert?version=9").status_code == 404
    assert send(api, "POST", "/rules/ct/revert?version=0").status_code == 422
    send(api, "DELETE", "/rules/ct")
    assert error_locs(send(api, "POST", "/rules/ct/revert?version=5")) == [["query", "version"]]
    assert send(api, "POST", "/rules/ct/revert?version=2").json()["version"] == 6  # undeleted
    rows = audit_rows(api.context.sessions, AuditAction.RULE_CHANGED)
    assert [r["details"]["change"] for r in rows] == [
        "created",
        "updated",
        "disabled",
        "reverted",
        "deleted",
        "reverted",
    ]
    assert rows[3]["details"]["reverted_to"] == 1
    assert send(api, "GET", "/rules/nothing/history").status_code == 404


def test_a_revert_to_a_version_naming_a_destination_since_deleted_is_refused(
    api: ApiHarness,
) -> None:
    created(api, "/destinations", PACS)
    created(api, "/rules", {**CT_RULE, "destinations": ["pacs"]})
    send(api, "PUT", "/rules/ct", json=CT_RULE)
    assert send(api, "DELETE", "/destinations/pacs").status_code == 200
    response = send(api, "POST", "/rules/ct/revert?version=1")
    assert error_locs(response) == [["body", "destinations", 0]]
    assert send(api, "POST", "/destinations/pacs/revert?version=1").status_code == 200
    assert send(api, "POST", "/rules/ct/revert?version=1").status_code == 200


# -- the dispatcher sees a change at once ------------------------------------------------------


def _no_outputs(spec: JobSpec) -> JobResult:
    return JobResult(spec.job_id, (), (), "test")


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiHarness]:
    """The API beside a running dispatcher that would reload the routing only hourly by
    itself: what it routes by, it has from the API's ``routing_changed``."""
    monkeypatch.setattr(dispatcher_module, "ROUTING_RELOAD_SECONDS", 3600.0)
    settings = settings_for(tmp_path, dispatcher_interval_seconds=0.05)
    upgrade(settings.effective_database_url)
    sessions = make_sessionmaker(make_engine(settings.effective_database_url))
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(_no_outputs))
    dispatcher.start()
    context = ApiContext(
        settings,
        sessions,
        wake_dispatcher=dispatcher.wake,
        routing_changed=dispatcher.routing_changed,
    )
    try:
        with api_harness(settings, context) as api:
            yield api
    finally:
        dispatcher.stop()


def test_a_rule_created_through_the_api_routes_the_next_study_without_a_restart(
    live: ApiHarness,
) -> None:
    created(live, "/rules", {**CT_RULE, "name": "ct-api"})
    index_series(live, 1)
    with live.context.sessions.begin() as session:
        complete_quiet_studies(session, 1.0, now=LATER_THAN_RECEIVED)
    live.context.wake_dispatcher()
    deadline = time.monotonic() + 5
    names: list[str] = []
    while time.monotonic() < deadline and not names:
        with live.context.sessions() as session:
            names = list(session.scalars(select(Job.rule_name)))
        time.sleep(0.05)
    assert names == ["ct-api"]


def test_a_running_nodes_dispatcher_sees_a_rule_disabled_through_its_api_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatcher_module, "ROUTING_RELOAD_SECONDS", 3600.0)
    port = free_port()
    node = Node(settings_for(tmp_path, http_port=port, destinations=[PACS], rules=[CT_RULE]))
    node.start()
    try:
        assert node.sessions is not None and node.dispatcher is not None
        with node.sessions.begin() as session:
            token = create_token(session, "admin", TokenRole.ADMIN, Actor.os_user())
        url = f"http://127.0.0.1:{port}/api/v1/rules/ct/disable"
        response = httpx.post(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 2
        while node.dispatcher.routing.rules[0].enabled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not node.dispatcher.routing.rules[0].enabled
    finally:
        node.stop(grace_seconds=1)


# -- trying a rule ---------------------------------------------------------------------------


def test_trying_a_rule_on_received_studies_says_which_series_and_why_not(
    api: ApiHarness,
) -> None:
    index_series(api, 1, description="Thorax 1.0")
    index_series(api, 2, modality="MR", description="T1 brain")
    draft = {
        "name": "draft",
        "enabled": False,
        "match": {"Modality": "CT", "PatientID": {"regex": "^SECRET"}},
        "pipeline": ["gaussian"],
        "destinations": ["nowhere"],
    }
    for role in (TokenRole.VIEWER, TokenRole.OPERATOR):
        assert send(api, "POST", "/rules/test", role, json={"rule": draft}).status_code == 403
    response = send(api, "POST", "/rules/test", json={"rule": draft})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["studies_examined"] == 1 and answer["series_examined"] == 2
    assert answer["series_matched"] == 0 and answer["rule_enabled"] is False
    assert any("destinations.0" in note for note in answer["notes"])  # would be refused
    assert any("disabled" in note for note in answer["notes"])
    ct, mr = answer["studies"][0]["series"]
    assert (ct["series_description"], ct["matched"]) == ("Thorax 1.0", False)
    assert ct["reasons"] == ["PatientID does not match"]
    assert mr["reasons"][0] == "Modality 'MR' does not match 'CT'"
    modality = next(c for c in mr["checks"] if c["criterion"] == "match.Modality")
    assert (modality["wanted"], modality["seen"], modality["passed"]) == ("'CT'", "MR", False)
    assert answer["failures"] == {"match.PatientID": 2, "match.Modality": 1}
    for patient_value in ("SECRET", "SYN-0001", "19700101", PATIENT_NAME):
        assert patient_value not in response.text
    assert audit_rows(api.context.sessions, AuditAction.PHI_READ) == []

    created(api, "/rules", {**CT_RULE, "name": "stored"})
    stored = send(api, "POST", "/rules/test", json={"name": "stored", "limit": 5}).json()
    assert [s["matched"] for s in stored["studies"][0]["series"]] == [True, False]
    assert stored["series_matched"] == 1
    with api.context.sessions() as session:
        assert session.scalars(select(Job)).all() == []  # nothing ran, nothing was made
    future = send(api, "POST", "/rules/test", json={"name": "stored", "since": "2999-01-01T00:00"})
    assert future.json()["studies_examined"] == 0
    assert send(api, "POST", "/rules/test", json={"name": "nothing"}).status_code == 404
    both = send(api, "POST", "/rules/test", json={"name": "stored", "rule": CT_RULE})
    assert "either rule" in both.text and both.status_code == 422


def test_the_tester_and_the_dispatcher_agree(api: ApiHarness) -> None:
    index_series(api, 1)
    index_series(api, 2, num_slices=2)
    rule = {**CT_RULE, "min_instances": 3}
    answer = send(api, "POST", "/rules/test", json={"rule": rule}).json()
    with api.context.sessions() as session:
        settings = api.context.settings.model_copy(update={"rules": (rule_model(rule),)})
        decisions = route(settings, session, answer["studies"][0]["study_id"])
    tried = {s["series_instance_uid"]: s["matched"] for s in answer["studies"][0]["series"]}
    assert tried == {d.series_instance_uid: d.matched for d in decisions}
    assert sorted(tried.values()) == [False, True]


def rule_model(definition: dict[str, Any]) -> Any:
    from dicom_node.config import Rule

    return Rule.model_validate(definition)
