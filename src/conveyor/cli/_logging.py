"""How the command line logs: every line stamped with the time, as text or as JSON lines.

The library only emits records; the CLI decides where they go and how they look (``conveyor
--log-format text|json -v COMMAND``). Text lines read ``2026-12-01T15:04:05.123Z WARNING
conveyor.consumer: message``, a traceback following on indented lines; JSON lines are one
object each, with ``time``, ``level``, ``logger``, ``message`` and, when there is one,
``exception`` (the traceback text).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "configure", "error_line", "iso_time"]

#: the values of --log-format
FORMATS = ("text", "json")
#: the CLI's own notices (started, waiting for the server, stopped) show at the default verbosity
CLI_LOGGER = "conveyor.cli"
#: a command whose progress is its own output logs its details here, at the library's level
QUIET_LOGGERS = ("conveyor.cli.demo",)

_format = "text"


def iso_time(created: float) -> str:
    """A record's time in UTC, ISO 8601 with milliseconds.

    >>> iso_time(1_700_000_000.1234)
    '2023-11-14T22:13:20.123Z'
    """
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>``; a traceback on the lines after it, indented, so
    every line that starts at the margin starts with a time."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{iso_time(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        details = _details(self, record)
        if details:
            line += "\n" + "\n".join("    " + part for part in details.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time``, ``level``, ``logger``, ``message``
    and, when there is one, ``exception`` (the traceback as text)."""

    def format(self, record: logging.LogRecord) -> str:
        row = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        details = _details(self, record)
        if details:
            row["exception"] = details
        return json.dumps(row, ensure_ascii=False)


def _details(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to ``sys.stderr`` as it is at each record, so log lines print above a live
    progress display (which swaps ``sys.stderr`` for a proxy while it runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(verbose: int, log_format: str) -> None:
    """Send every log record to stderr in ``log_format``: conveyor's at WARNING (``verbose``
    1: INFO, 2: DEBUG) and the CLI's own notices at INFO; other libraries' at WARNING."""
    global _format
    _format = log_format
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("conveyor").setLevel(level)
    logging.getLogger(CLI_LOGGER).setLevel(min(level, logging.INFO))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)


def error_line(message: str) -> str:
    """The line a failed command ends with: ``error: <message>``, or with --log-format json
    a JSON object like the log lines (level ERROR), so a log collector reads it too."""
    if _format != "json":
        return f"error: {message}"
    row = {
        "time": iso_time(datetime.now(UTC).timestamp()),
        "level": "ERROR",
        "logger": CLI_LOGGER,
        "message": message,
    }
    return json.dumps(row, ensure_ascii=False)
