"""What the command line logs looks like: every line stamped with the time (UTC, ISO 8601 with
milliseconds), as text or, with ``--log-format json``, one JSON object per line; a traceback
indented under its line, or as the object's ``exception``."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from conveyor._keys import heartbeat_key
from conveyor.cli._logging import JsonFormatter, TextFormatter
from tests.test_cli import Running, _env
from tests.test_cli_commands import cli

Name = Callable[[str], str]

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
TEXT_LINE = re.compile(rf"^{TIME} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def json_lines(stderr: str) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in stderr.splitlines()]
    for row in rows:
        assert {"time", "level", "logger", "message"} <= row.keys(), row
        assert re.fullmatch(TIME, row["time"]), row
    return rows


@pytest.fixture
def wrong_heartbeats(r: redis.Redis, name: Name) -> str:
    """A stream whose heartbeats key another client made a string: the monitor warns."""
    stream = name("orders")
    r.xadd(stream, {"n": 1})
    r.xgroup_create(stream, "g", "0")
    r.set(heartbeat_key(stream, "g"), "x")
    return stream


def test_a_warning_as_text_carries_the_time(redis_url: str, wrong_heartbeats: str) -> None:
    result = cli("monitor", "-s", wrong_heartbeats, url=redis_url)

    (warning,) = [line for line in result.stderr.splitlines() if "conveyor.monitor" in line]
    assert TEXT_LINE.match(warning), warning
    assert " WARNING conveyor.monitor: " in warning and "is not a hash" in warning


def test_a_warning_as_json(redis_url: str, wrong_heartbeats: str) -> None:
    result = cli("--log-format", "json", "monitor", "-s", wrong_heartbeats, url=redis_url)

    logged = [line for line in result.stderr.splitlines() if line.startswith("{")]
    (row,) = json_lines("\n".join(logged))
    assert (row["level"], row["logger"]) == ("WARNING", "conveyor.monitor")
    assert "is not a hash" in row["message"] and "exception" not in row


def test_the_format_can_come_from_the_environment(redis_url: str, wrong_heartbeats: str) -> None:
    env = {**_env(), "REDIS_URL": redis_url, "CONVEYOR_LOG_FORMAT": "json"}

    result = cli("monitor", "-s", wrong_heartbeats, env=env)

    assert any(line.startswith('{"time": ') for line in result.stderr.splitlines())


def test_an_exception_as_text_is_indented_under_its_line(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    key = name("string")
    r.set(key, "x")

    result = cli("-vv", "consume", "-s", key, "-g", "g", url=redis_url)

    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: ") and "WRONGTYPE" in lines[-1]
    start = next(i for i, line in enumerate(lines) if "DEBUG conveyor.cli: command failed" in line)
    assert TEXT_LINE.match(lines[start])
    assert lines[start + 1] == "    Traceback (most recent call last):"
    for line in lines[:-1]:
        assert TEXT_LINE.match(line) or line.startswith("    ") or not line.strip(), line


def test_an_exception_as_json_is_its_exception_field(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    key = name("string")
    r.set(key, "x")

    result = cli("-vv", "--log-format", "json", "consume", "-s", key, "-g", "g", url=redis_url)

    rows = json_lines(result.stderr)  # every line, the error too, is one JSON object
    failed = next(row for row in rows if row["message"] == "command failed")
    assert failed["level"] == "DEBUG"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert "WRONGTYPE" in failed["exception"].splitlines()[-1]
    assert rows[-1]["level"] == "ERROR" and "WRONGTYPE" in rows[-1]["message"]
    assert result.returncode == 1


FAILING = """
def handle(batch):
    raise ValueError("no such customer")
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_worker_logs_only_stamped_lines(
    redis_url: str, r: redis.Redis, name: Name, tmp_path: Path, log_format: str
) -> None:
    (tmp_path / "failing.py").write_text(FAILING)
    stream = name("orders")
    r.xadd(stream, {"n": 1})
    env = {**_env(), "REDIS_URL": redis_url, "PYTHONPATH": str(tmp_path)}
    args = ("run", "failing:handle", "-s", stream, "-g", "g", "--max-wait-ms", "50")
    run = Running("--log-format", log_format, *args, env=env)
    try:
        run.wait_for("handler failed")
        run.proc.send_signal(signal.SIGTERM)
        returncode, output = run.finish()
    finally:
        run.kill()

    assert returncode == 0, output
    if log_format == "json":
        rows = json_lines(output)
        failed = next(row for row in rows if "handler failed" in row["message"])
        assert failed["level"] == "ERROR"
        assert failed["exception"].startswith("Traceback (most recent call last):")
        assert "ValueError: no such customer" in failed["exception"]
        assert any(row["message"].startswith("worker ") for row in rows)  # its notices too
        for row in rows:
            assert "exception" not in row or row["exception"].startswith("Traceback")
    else:
        for line in output.splitlines():
            assert TEXT_LINE.match(line) or line.startswith("    "), line
        failed = next(line for line in output.splitlines() if "handler failed" in line)
        assert " ERROR " in failed
        assert "ValueError: no such customer" in output  # the traceback, indented below


def record(exc_info: bool) -> logging.LogRecord:
    try:
        raise ValueError("boom")
    except ValueError:
        info = sys.exc_info() if exc_info else None
    return logging.LogRecord("conveyor.consumer", logging.ERROR, __file__, 1, "a %s", ("b",), info)


def test_the_formatters() -> None:
    plain = TextFormatter().format(record(exc_info=False))
    assert TEXT_LINE.match(plain) and plain.endswith(" ERROR conveyor.consumer: a b")
    failed = TextFormatter().format(record(exc_info=True)).splitlines()
    assert failed[1] == "    Traceback (most recent call last):"
    assert failed[-1] == "    ValueError: boom"
    row = json.loads(JsonFormatter().format(record(exc_info=True)))
    assert row["message"] == "a b" and row["exception"].endswith("ValueError: boom")
    assert "exception" not in json.loads(JsonFormatter().format(record(exc_info=False)))
