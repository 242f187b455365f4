"""structlog set-up: JSON lines when not on a terminal, readable console output when on one."""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import ExceptionRenderer


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time: a logger bound to the stream object
    seen at set-up would write to a closed file once that stream is swapped (as test runners
    and daemonising code do), and raise from inside an error handler."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def traceback_formatter() -> ExceptionRenderer:
    """How the console shows a logged exception's traceback: never with local variables.

    structlog's default, when rich is installed (it comes with other packages), prints every
    frame's locals; a frame holding the mesh secret, a key seed, a data-plane key or ticket
    as a local would put it on the terminal and in whatever captures it.
    """
    try:
        import rich  # noqa: F401
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


_configured: str | None = None  # "explicit" once a level was asked for on the command line


def configure(level: str = "warning", *, explicit: bool = False) -> None:
    """Set up logging at *level*. A level given on the command line (*explicit*) stays; a
    default one is replaced by a later call (the daemon's ``[log] level``)."""
    global _configured
    if _configured == "explicit" or (_configured and not explicit and level == _configured):
        return
    _configured = "explicit" if explicit else level
    lvl = getattr(logging, level.upper(), logging.WARNING)
    tty = sys.stderr.isatty()
    renderer = (
        structlog.dev.ConsoleRenderer(exception_formatter=traceback_formatter())
        if tty
        else structlog.processors.JSONRenderer()
    )
    # A daemon's JSON lines carry a logged exception's traceback as plain text (never
    # dict_tracebacks: it records every frame's locals, secrets among them).
    exc_text = [] if tty else [structlog.processors.format_exc_info]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            *exc_text,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
    )
    # Third-party stdlib loggers go through the same renderer.
    handler = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.processors.add_log_level],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
