"""Rendering a page: the Jinja2 templates of this package, the navigation a role may use,
the CSRF token the page's forms and scripts send back, and headers that keep the pages
to themselves (no framing, no scripts but the node's own, nothing cached)."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from db.enums import TokenRole
from dicom_node import __version__
from dicom_node.api.auth import CSRF_COOKIE, Caller, new_csrf_token
from dicom_node.api.tokens import allows

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str
    role: TokenRole


NAVIGATION = (
    NavItem("/", "Overview", TokenRole.VIEWER),
    NavItem("/studies", "Studies", TokenRole.VIEWER),
    NavItem("/jobs", "Jobs", TokenRole.VIEWER),
    NavItem("/rules", "Rules", TokenRole.VIEWER),
    NavItem("/plugins", "Plugins & models", TokenRole.VIEWER),
    NavItem("/audit", "Audit", TokenRole.ADMIN),
)


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dicom_node.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = format_time
    env.filters["seconds"] = format_seconds
    return env


def format_time(value: dt.datetime | str | None) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def page(
    request: Request,
    template: str,
    caller: Caller | None,
    *,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    """``template`` rendered for ``caller`` (None: signed out)."""
    csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_token()
    html = (
        environment()
        .get_template(template)
        .render(
            request_path=request.url.path,
            caller=caller,
            can_operate=caller is not None and allows(caller.role, TokenRole.OPERATOR),
            can_administer=caller is not None and allows(caller.role, TokenRole.ADMIN),
            navigation=[
                item for item in NAVIGATION if caller is not None and allows(caller.role, item.role)
            ],
            csrf_token=csrf,
            version=__version__,
            **values,
        )
    )
    response = HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
    if request.cookies.get(CSRF_COOKIE) != csrf:
        set_csrf_cookie(request, response, csrf)
    return response


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def set_csrf_cookie(request: Request, response: Any, value: str) -> None:
    """The page carries the same value (a form field, a meta tag its script sends back as
    a header); the cookie itself stays out of reach of scripts and of other sites."""
    response.set_cookie(
        CSRF_COOKIE, value, httponly=True, samesite="strict", secure=is_https(request), path="/"
    )
