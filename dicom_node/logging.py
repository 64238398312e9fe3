"""Structured logs (structlog). Handlers log UIDs and AE titles, never patient attributes."""

from __future__ import annotations

import logging
import sys
import warnings

import structlog

#: Libraries that name an element's value (a patient's name, ID, birth date) when they warn
#: about it, both in a ``logging`` record and in a ``warnings`` warning.
VALUE_NAMING_LIBRARIES = ("pydicom", "highdicom")


def keep_patient_values_out_of_logs(level: int = logging.INFO) -> None:
    """Above DEBUG, silence what pydicom and highdicom say about a value ("Invalid value
    for VR DA: '1961-04-09'"): their warnings, and their log records below ERROR; at DEBUG,
    let them through again. For each process that reads the data: the node, a worker, the
    command line. Calling it again replaces the filters (they do not pile up)."""
    debugging = level <= logging.DEBUG
    for library in VALUE_NAMING_LIBRARIES:
        logging.getLogger(library).setLevel(logging.NOTSET if debugging else logging.ERROR)
        module = rf"{library}(\.|$)"
        if debugging:
            warnings.filterwarnings("default", category=UserWarning, module=module)
        else:
            warnings.filterwarnings("ignore", category=UserWarning, module=module)


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    numeric = logging.getLevelName(level)
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s", force=True)
    keep_patient_values_out_of_logs(numeric)
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
