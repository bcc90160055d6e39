"""structlog set-up: JSON when not on a terminal, console colours otherwise.

Context such as ``series`` and ``volume`` is bound with
:func:`structlog.contextvars.bound_contextvars` and appears on every line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger once per process.

    ``json=None`` chooses JSON when stderr is not a terminal.
    """
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs through the stdlib: keep it quiet unless debugging.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    )


def get_logger(name: str, **context: Any) -> Any:
    """A structlog logger bound with ``component=name`` and extra context.

    The logger stays lazy, so one created at import time still follows a
    :func:`configure_logging` call made later.
    """
    return structlog.get_logger(component=name, **context)
