"""The pages of what admins change: rules and plugins (and models).

Rules: every rule as the JSON document the API and ``node.toml`` validate, with "Save"
(``PUT /api/v1/rules/{name}``, the 422's reason shown beside the field) and "Try on past
studies" (``POST /api/v1/rules/test``), both for admins, by ``static/rules.js``.
Plugins: each discovered plugin with its version, availability and the admin's choices;
admins get enable/disable buttons (``POST /api/v1/plugins/{name}/enable``...). Models:
listed, detailed (versions, evaluation), uploaded, enabled and disabled through
``/api/v1/models`` by ``static/plugins.js``.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from db.models import RoutingEntryKind
from dicom_node.api.context import get_context
from dicom_node.dashboard.rendering import page
from dicom_node.dashboard.session import PageCaller
from dicom_node.plugin_state import list_plugins
from dicom_node.routing_admin import list_entries

router = APIRouter(include_in_schema=False)


@router.get("/rules")
def rules_page(request: Request, caller: PageCaller) -> HTMLResponse:
    with get_context(request).sessions() as session:
        entries = list_entries(session, RoutingEntryKind.RULE)
    rules = []
    for entry in entries:
        document = json.dumps(entry.definition, indent=2)
        rules.append(
            {
                "name": entry.name,
                "origin": str(entry.origin),
                "version": entry.version,
                "enabled": entry.definition.get("enabled", True),
                "updated_at": entry.updated_at,
                "note": entry.note,
                "document": document,
                "lines": min(24, 2 + document.count("\n")),
            }
        )
    return page(request, "rules.html", caller, rules=rules, scripts=["rules.js"])


@router.get("/plugins")
def plugins_page(request: Request, caller: PageCaller) -> HTMLResponse:
    with get_context(request).sessions() as session:
        plugins = sorted(list_plugins(session), key=lambda plugin: (plugin.family, plugin.name))
    return page(request, "plugins.html", caller, plugins=plugins, scripts=["plugins.js"])
