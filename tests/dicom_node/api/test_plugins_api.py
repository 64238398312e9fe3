"""/api/v1/plugins: the discovered plugins with the admin's choices; enable, disable, pin
and unpin by admins only, each audited; the rules that use a plugin are named."""

from __future__ import annotations

from typing import Any

from db.enums import TokenRole
from dicom_node.api.testing import ApiHarness
from dicom_node.plugin_state import load_states
from dicom_node.security.audit import AuditAction
from tests.dicom_node.security.audit_support import audit_rows

ADMIN = TokenRole.ADMIN


def send(api: ApiHarness, method: str, path: str, role: TokenRole = ADMIN, **kw: Any) -> Any:
    return api.client.request(method, f"/api/v1{path}", headers=api.headers(role), **kw)


def test_the_list_has_the_builtins_with_versions_and_availability(api: ApiHarness) -> None:
    response = send(api, "GET", "/plugins", TokenRole.VIEWER)
    assert response.status_code == 200
    plugins = {p["name"]: p for p in response.json()}
    gaussian = plugins["gaussian"]
    assert gaussian["family"] == "denoise" and gaussian["version"]
    assert gaussian["available"] is True and gaussian["enabled"] is True
    assert gaussian["pinned_version"] is None and gaussian["builtin"] is True
    one = send(api, "GET", "/plugins/gaussian", TokenRole.VIEWER).json()
    assert "sigma_mm" in one["params_schema"]["properties"] and one["rules_using"] == []
    missing = send(api, "GET", "/plugins/gausian", TokenRole.VIEWER)
    assert missing.status_code == 404 and "gaussian" in missing.json()["detail"]


def test_disable_enable_pin_unpin_are_stored_and_audited(api: ApiHarness) -> None:
    rule = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}
    assert send(api, "POST", "/rules", json=rule).status_code == 201
    disabled = send(api, "POST", "/plugins/gaussian/disable").json()
    assert disabled["enabled"] is False and disabled["rules_using"] == ["ct"]
    assert "ct" in disabled["warning"]
    version = disabled["version"]
    pinned = send(api, "POST", "/plugins/gaussian/pin", json={"version": "0.0-other"}).json()
    assert pinned["pinned_version"] == "0.0-other" and pinned["available"] is False
    assert send(api, "POST", "/plugins/gaussian/unpin").json()["available"] is True
    assert send(api, "POST", "/plugins/gaussian/enable").json()["enabled"] is True
    assert send(api, "POST", "/plugins/gaussian/pin", json={"version": version}).status_code == 200
    with api.context.sessions() as session:
        choice = load_states(session)["gaussian"]
    assert choice.enabled and choice.pinned_version == version
    rows = audit_rows(api.context.sessions, AuditAction.PLUGIN_CHANGED)
    assert [r["details"] for r in rows] == [
        {"enabled": False},
        {"pinned_version": "0.0-other"},
        {"pinned_version": None},
        {"enabled": True},
        {"pinned_version": version},
    ]
    assert {(r["object_id"], r["actor"]) for r in rows} == {("gaussian", "admin")}


def test_bad_requests_and_roles(api: ApiHarness) -> None:
    assert send(api, "POST", "/plugins/nothing/disable").status_code == 404
    response = send(api, "POST", "/plugins/gaussian/pin", json={"version": ""})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == [
        "body",
        "version",
    ]
    for role in (TokenRole.VIEWER, TokenRole.OPERATOR):
        for action in ("enable", "disable", "unpin"):
            assert send(api, "POST", f"/plugins/gaussian/{action}", role).status_code == 403
        pin = send(api, "POST", "/plugins/gaussian/pin", role, json={"version": "1"})
        assert pin.status_code == 403
    assert audit_rows(api.context.sessions, AuditAction.PLUGIN_CHANGED) == []
    with api.context.sessions() as session:
        assert load_states(session) == {}
