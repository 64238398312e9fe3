"""Structured logs (structlog). Handlers log UIDs and AE titles, never patient attributes."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from types import TracebackType

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
    """The process's logs on stderr. ``fmt = "json"``: one JSON object per line for every
    line, the libraries' (``logging`` records and Python warnings) as well as the node's,
    a traceback inside its line (``exception``)."""
    numeric = logging.getLevelName(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_json_formatter() if fmt == "json" else logging.Formatter("%(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    logging.captureWarnings(fmt == "json")
    if fmt == "json":  # an exception nobody caught: its traceback in one line too
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda hook: _log_uncaught(
            hook.exc_type, hook.exc_value or hook.exc_type(), hook.exc_traceback
        )
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


def _json_formatter() -> logging.Formatter:
    """Renders a ``logging`` record as the node's own JSON lines are rendered."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    structlog.get_logger(__name__).error("uncaught exception", exc_info=(kind, error, traceback))
