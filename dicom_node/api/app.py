"""The REST API (``/api/v1``), its health checks and, beside them, the dashboard.

FastAPI rather than Litestar: the node's configuration is already pydantic models
(``Rule``, ``Destination``), so the API validates a rule or destination with the very
model that validates ``node.toml`` and ``/openapi.json`` describes it from that model;
Litestar would need an adapter or a second schema (msgspec) to do the same.

Each part of the API is a router in a module of its own, listed in ``ROUTERS``.
"""

from __future__ import annotations

import tempfile

from fastapi import APIRouter, FastAPI, Request, status
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from dicom_node import __version__
from dicom_node.api import audit_routes, exports, jobs, studies
from dicom_node.api.context import ApiContext, get_context
from dicom_node.api.metrics_route import router as metrics_router
from dicom_node.api.models_api import router as models_router
from dicom_node.api.plugins_api import router as plugins_router
from dicom_node.api.routing_api import router as routing_router
from dicom_node.dashboard import routes as dashboard
from dicom_node.disk_space import free_bytes
from processors.errors import BadInputError

API_PREFIX = "/api/v1"

health = APIRouter(tags=["health"])


@health.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/readyz",
    summary="The database answers, the spool is writable (and its disk above the low-disk"
    " watermark) and the executor has workers",
    responses={503: {"description": "Not ready: the checks that failed, by name"}},
)
def readyz(request: Request) -> JSONResponse:
    context = get_context(request)
    checks = {
        "database": _database_answers(context),
        "spool": _spool_writable(context),
        "executor": context.executor_slots is None or context.executor_slots() > 0,
        "disk_space": _disk_space_left(context),
    }
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


def _database_answers(context: ApiContext) -> bool:
    try:
        with context.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception:  # any failure means "not ready"; the reason is the database's log
        return False
    return True


def _spool_writable(context: ApiContext) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=context.settings.spool_dir, prefix=".readyz-"):
            pass
    except OSError:
        return False
    return True


def _disk_space_left(context: ApiContext) -> bool:
    """The spool's disk is above the low-disk watermark (receivers store, not 0xA700)."""
    settings = context.settings
    try:
        return free_bytes(settings.spool_dir) >= settings.receive_min_free_bytes
    except OSError:
        return False


def _bad_input(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


ROUTERS: tuple[tuple[APIRouter, str], ...] = (
    (health, ""),
    (models_router, f"{API_PREFIX}/models"),
    (routing_router, API_PREFIX),
    (plugins_router, API_PREFIX),
    (models_router, f"{API_PREFIX}/models"),
    (metrics_router, ""),
    (studies.router, API_PREFIX),
    (jobs.router, API_PREFIX),
    (exports.router, API_PREFIX),
    (audit_routes.router, API_PREFIX),
    (dashboard.router, ""),
)


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="dicom-node",
        version=__version__,
        description="Administer a dicom-node: studies, jobs, exports, routing rules, "
        "destinations, plugins, models and the audit trail. Every /api/v1 route needs "
        "`Authorization: Bearer <token>`; roles: viewer < operator < admin.",
    )
    app.state.context = context
    app.add_exception_handler(BadInputError, _bad_input)
    for router, prefix in ROUTERS:
        app.include_router(router, prefix=prefix)
    app.mount(dashboard.STATIC_PATH, StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    return app
