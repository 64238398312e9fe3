"""Every route x every role: a token too low is refused (403), a token high enough is let
through (anything but 401/403), no token is 401. The table below is the contract: a route
that is not in it fails the test, so a new route must say which role it needs."""

from __future__ import annotations

import re

import pytest

from db.enums import TokenRole
from dicom_node.api.testing import ApiHarness

VIEWER, OPERATOR, ADMIN = TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN
PUBLIC = None

#: (method, path template) -> the lowest role allowed; PUBLIC: no token needed.
ROUTE_ROLES: dict[tuple[str, str], TokenRole | None] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    # rules, destinations, plugins (routing_api.py, plugins_api.py)
    ("GET", "/api/v1/rules"): VIEWER,
    ("POST", "/api/v1/rules"): ADMIN,
    ("POST", "/api/v1/rules/test"): ADMIN,  # runs an admin's regexes on the node
    ("GET", "/api/v1/rules/{name}"): VIEWER,
    ("PUT", "/api/v1/rules/{name}"): ADMIN,
    ("DELETE", "/api/v1/rules/{name}"): ADMIN,
    ("POST", "/api/v1/rules/{name}/enable"): ADMIN,
    ("POST", "/api/v1/rules/{name}/disable"): ADMIN,
    ("GET", "/api/v1/rules/{name}/history"): VIEWER,
    ("POST", "/api/v1/rules/{name}/revert"): ADMIN,
    ("GET", "/api/v1/destinations"): VIEWER,
    ("POST", "/api/v1/destinations"): ADMIN,
    ("GET", "/api/v1/destinations/{name}"): VIEWER,
    ("PUT", "/api/v1/destinations/{name}"): ADMIN,
    ("DELETE", "/api/v1/destinations/{name}"): ADMIN,
    ("GET", "/api/v1/destinations/{name}/history"): VIEWER,
    ("POST", "/api/v1/destinations/{name}/revert"): ADMIN,
    ("GET", "/api/v1/plugins"): VIEWER,
    ("GET", "/api/v1/plugins/{name}"): VIEWER,
    ("POST", "/api/v1/plugins/{name}/enable"): ADMIN,
    ("POST", "/api/v1/plugins/{name}/disable"): ADMIN,
    ("POST", "/api/v1/plugins/{name}/pin"): ADMIN,
    ("POST", "/api/v1/plugins/{name}/unpin"): ADMIN,
    # models (models_api.py)
    ("GET", "/api/v1/models"): VIEWER,
    ("POST", "/api/v1/models"): ADMIN,
    ("GET", "/api/v1/models/{name}"): VIEWER,
    ("DELETE", "/api/v1/models/{name}"): ADMIN,
    ("POST", "/api/v1/models/{name}/enable"): ADMIN,
    ("POST", "/api/v1/models/{name}/disable"): ADMIN,
    ("GET", "/metrics"): VIEWER,
    # studies, jobs, exports, audit (studies.py, jobs.py, exports.py, audit_routes.py)
    ("GET", "/api/v1/studies"): VIEWER,
    ("GET", "/api/v1/studies/{study_uid}"): VIEWER,
    ("GET", "/api/v1/series/{series_uid}"): VIEWER,
    ("GET", "/api/v1/jobs"): VIEWER,
    ("GET", "/api/v1/jobs/{job_id}"): VIEWER,
    ("POST", "/api/v1/jobs/{job_id}/retry"): OPERATOR,
    ("POST", "/api/v1/jobs/{job_id}/cancel"): OPERATOR,
    ("GET", "/api/v1/exports"): VIEWER,
    ("GET", "/api/v1/exports/{export_id}"): VIEWER,
    ("POST", "/api/v1/exports/{export_id}/retry"): OPERATOR,
    ("POST", "/api/v1/exports/{export_id}/cancel"): OPERATOR,
    ("GET", "/api/v1/audit"): ADMIN,  # names every token, address and study read
}

PATH_PARAMETER = re.compile(r"\{([^}]+)\}")


def openapi_routes(api: ApiHarness) -> list[tuple[str, str]]:
    document = api.client.get("/openapi.json").json()
    return sorted(
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    )


def concrete(path: str) -> str:
    """The path with each parameter given a value that names nothing (an id of 999999)."""
    return PATH_PARAMETER.sub(lambda match: "999999", path)


def test_every_route_is_in_the_table(api: ApiHarness) -> None:
    missing = [route for route in openapi_routes(api) if route not in ROUTE_ROLES]
    assert not missing, f"routes without a declared role: {missing}"
    gone = [route for route in ROUTE_ROLES if route not in openapi_routes(api)]
    assert not gone, f"routes in the table that the API no longer has: {gone}"


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_ROLES))
def test_each_role_on_each_route(api: ApiHarness, method: str, path: str) -> None:
    needed = ROUTE_ROLES[(method, path)]
    url = concrete(path)
    anonymous = api.client.request(method, url)
    if needed is PUBLIC:
        assert anonymous.status_code not in (401, 403), anonymous.text
        return
    assert anonymous.status_code == 401, anonymous.text
    for role in TokenRole:
        response = api.client.request(method, url, headers=api.headers(role))
        allowed = list(TokenRole).index(role) >= list(TokenRole).index(needed)
        if allowed:
            assert response.status_code not in (401, 403), (role, response.text)
        else:
            assert response.status_code == 403, (role, response.text)
