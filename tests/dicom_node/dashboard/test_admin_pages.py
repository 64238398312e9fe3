"""The rules page: each rule's JSON in a box that admins may save and try on past studies;
the plugins page with its buttons for admins."""

from __future__ import annotations

import json

from db.enums import TokenRole
from db.models import RoutingEntry, RoutingEntryKind, RoutingOrigin
from dicom_node.api.testing import ApiHarness
from dicom_node.plugin_state import set_state
from tests.dicom_node.dashboard.dashboard_support import signed_in

LUNGS = {"name": "lungs", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}


def add_rule(
    api: ApiHarness, definition: dict[str, object], origin: RoutingOrigin = RoutingOrigin.API
) -> None:
    with api.context.sessions.begin() as session:
        session.add(
            RoutingEntry(
                kind=RoutingEntryKind.RULE,
                name=str(definition["name"]),
                definition=definition,
                origin=origin,
            )
        )


def rule_section(html: str, name: str) -> str:
    return html.split(f'id="rule-{name}"', 1)[1].split("</section>", 1)[0]


def test_admins_may_save_a_rule_and_try_it_others_only_read_it(api: ApiHarness) -> None:
    add_rule(api, LUNGS)
    admin = rule_section(signed_in(api, TokenRole.ADMIN).get("/rules").text, "lungs")
    assert 'class="save"' in admin and "readonly" not in admin
    assert 'class="try secondary"' in admin
    assert 'data-api-url="/api/v1/rules/lungs/disable"' in admin
    shown = admin.split("<textarea", 1)[1].split(">", 1)[1].split("</textarea>", 1)[0]
    document = json.loads(shown.replace("&#34;", '"'))
    assert {key: document[key] for key in LUNGS} == LUNGS
    assert document["enabled"] is True  # the defaults are shown too
    for role in (TokenRole.VIEWER, TokenRole.OPERATOR):
        html = signed_in(api, role).get("/rules").text
        section = rule_section(html, "lungs")
        assert 'class="save"' not in section and "readonly" in section
        assert "button" not in section
        assert "Changing rules needs the admin role" in html
        assert 'src="/static/rules.js"' in html


def test_a_rule_of_the_file_is_not_edited_here_but_may_be_disabled(api: ApiHarness) -> None:
    add_rule(api, {**LUNGS, "name": "from-file", "enabled": False}, RoutingOrigin.CONFIG)
    section = rule_section(signed_in(api, TokenRole.ADMIN).get("/rules").text, "from-file")
    assert 'class="save"' not in section and "readonly" in section
    assert "disabled · from config" in section
    assert 'data-api-url="/api/v1/rules/from-file/enable"' in section


def test_no_rules_is_said_plainly(api: ApiHarness) -> None:
    assert 'id="no-rules"' in signed_in(api, TokenRole.VIEWER).get("/rules").text


def test_the_rules_script_is_served(api: ApiHarness) -> None:
    script = api.client.get("/static/rules.js")
    assert script.status_code == 200
    assert "/api/v1/rules/test" in script.text and "X-CSRF-Token" not in script.text
    assert "X-CSRF-Token" in api.client.get("/static/dashboard.js").text


def test_the_plugins_page_lists_plugins_with_buttons_for_admins(api: ApiHarness) -> None:
    with api.context.sessions.begin() as session:
        set_state(session, "median", enabled=False)
    admin = signed_in(api, TokenRole.ADMIN).get("/plugins").text
    gaussian = admin.split('id="plugin-gaussian"', 1)[1].split("</tr>", 1)[0]
    assert 'data-api-url="/api/v1/plugins/gaussian/disable"' in gaussian
    median = admin.split('id="plugin-median"', 1)[1].split("</tr>", 1)[0]
    assert 'data-api-url="/api/v1/plugins/median/enable"' in median
    operator = signed_in(api, TokenRole.OPERATOR).get("/plugins").text
    assert 'id="plugin-gaussian"' in operator and "data-api-url" not in operator
