"""Logging set-up: context-rich lines for operators; journald adds its own timestamps."""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import Any

# vm / action / run / host of the work in progress, added to every line logged under it.
log_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_context", default=None)

_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = log_context.get()
        record.context = "".join(f" {k}={v}" for k, v in context.items()) if context else ""
        record.priority = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return True


def setup_logging(config: Any) -> None:
    """``config`` is sched.conf's LOG section (system, file, python_level)."""
    if config.system == "file" and config.file:
        handler: logging.Handler = logging.FileHandler(config.file)
        fmt = "%(asctime)s %(levelname)s %(name)s:%(context)s %(message)s"
    elif config.system == "journald":
        handler = logging.StreamHandler(sys.stderr)
        fmt = "<%(priority)d>%(name)s:%(context)s %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s:%(context)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.python_level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
