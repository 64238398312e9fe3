"""``GET /metrics``: the node's Prometheus metrics (``dicom_node.metrics``) in the text
exposition format, or OpenMetrics when the scraper asks for it.

It takes a viewer's bearer token like the API (Prometheus: ``authorization.credentials_file``
in the scrape config), unless ``metrics_public`` lets anyone on the network scrape.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client.exposition import choose_encoder

from db.enums import TokenRole
from dicom_node.api.auth import bearer_scheme, require
from dicom_node.api.context import get_context

router = APIRouter(tags=["metrics"])

_viewer = require(TokenRole.VIEWER)


def metrics_caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """A viewer's token, unless ``metrics_public``."""
    if not get_context(request).settings.metrics_public:
        _viewer(request, credentials)


@router.get(
    "/metrics",
    summary="Prometheus metrics (a viewer's token unless metrics_public)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    dependencies=[Depends(metrics_caller)],
)
def metrics(request: Request) -> Response:
    node_metrics = get_context(request).metrics
    assert node_metrics is not None  # ApiContext makes one
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(node_metrics.registry), media_type=content_type)
