"""Structured logs (structlog). Handlers log UIDs and AE titles, never patient attributes."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    numeric = logging.getLevelName(level)
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s", force=True)
    # pynetdicom logs whole datasets at DEBUG and the peer's details at INFO.
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    # Dask's client and cluster log every connection and worker start at INFO.
    logging.getLogger("distributed").setLevel(max(numeric, logging.WARNING))
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
