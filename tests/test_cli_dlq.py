"""``conveyor dlq ls | replay | purge`` end to end: real processes, no TTY unless one is made."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from typing import Any

import pytest
import redis

from conveyor._keys import dead_letter_key
from tests.test_cli import TIMEOUT_S, _env, assert_clean_error
from tests.test_cli import conveyor as run
from tests.test_deadletter import dead_letter


@pytest.fixture
def dead(r: redis.Redis, name: Any) -> tuple[str, list[str]]:
    """A stream with three dead letters: two of group billing (timeouts), one of audit."""
    stream = name("orders")
    ids = dead_letter(r, stream, [{"order_id": "1"}, {"order_id": "2"}], error="read timeout")
    ids += dead_letter(r, stream, [{"order_id": "3"}], group="audit", error="bad amount")
    return stream, ids


def test_ls_prints_a_table(redis_url: str, dead: tuple[str, list[str]]) -> None:
    stream, ids = dead

    result = run("dlq", "ls", "--url", redis_url, "--stream", stream)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    for word in ("origin id", "group", "consumer", "deliveries", "error", "time", "fields"):
        assert word in out
    for origin_id in ids:
        assert origin_id in out
    assert "read timeout" in out and "order_id=3" in out
    assert f"{dead_letter_key(stream)}: 3 entries" in out
    assert "Z" in out  # ISO 8601 times in UTC


def test_ls_json_lines(redis_url: str, dead: tuple[str, list[str]]) -> None:
    stream, ids = dead

    result = run("dlq", "ls", "--url", redis_url, "--stream", stream, "--json", "--count", "2")

    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["origin_id"] for row in rows] == ids[:2]
    assert rows[0]["fields"] == {"order_id": "1"}
    assert (rows[0]["group"], rows[0]["deliveries"], rows[0]["error"]) == (
        "billing",
        3,
        "read timeout",
    )


def test_replay_dry_run_changes_nothing(
    redis_url: str, r: redis.Redis, dead: tuple[str, list[str]]
) -> None:
    stream, _ = dead

    args = ("dlq", "replay", "--url", redis_url, "--stream", stream, "--dry-run")
    result = run(*args, "--error-contains", "timeout")

    assert result.returncode == 0, result.stderr
    assert "dry run: would replay 2 of 2 matching (scanned 3)" in result.stdout
    assert r.xlen(dead_letter_key(stream)) == 3
    assert r.xlen(stream) == 3


def test_replay_with_yes(redis_url: str, r: redis.Redis, dead: tuple[str, list[str]]) -> None:
    stream, _ = dead

    result = run("dlq", "replay", "--stream", stream, "--group", "audit", "--yes",
                 env=_env(REDIS_URL=redis_url))  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "replayed 1 of 1 matching (scanned 3)" in result.stdout
    assert r.xrange(stream)[-1][1] == {b"order_id": b"3"}
    assert r.xlen(dead_letter_key(stream)) == 2


def test_purge_with_yes(redis_url: str, r: redis.Redis, dead: tuple[str, list[str]]) -> None:
    stream, ids = dead
    base = ("dlq", "purge", "--url", redis_url, "--stream", stream, "--yes")

    some = run(*base, "--origin-id", ids[0], "--origin-id", ids[2])
    rest = run(*base)

    assert some.returncode == 0, some.stderr
    assert f"purged 2 entries from {dead_letter_key(stream)}" in some.stdout
    assert rest.returncode == 0, rest.stderr
    assert "purged 1 entry" in rest.stdout
    assert r.xlen(dead_letter_key(stream)) == 0
    assert r.xlen(stream) == 3


@pytest.mark.parametrize("command", ["replay", "purge"])
def test_without_yes_and_without_a_terminal_it_refuses(
    redis_url: str, r: redis.Redis, dead: tuple[str, list[str]], command: str
) -> None:
    stream, _ = dead

    result = run("dlq", command, "--url", redis_url, "--stream", stream)

    assert_clean_error(result)
    assert "--yes" in result.stderr
    assert r.xlen(dead_letter_key(stream)) == 3


@pytest.mark.parametrize(("answer", "left"), [("y", 0), ("n", 3)])
def test_on_a_terminal_it_asks(
    redis_url: str, r: redis.Redis, dead: tuple[str, list[str]], answer: str, left: int
) -> None:
    stream, _ = dead
    controller, terminal = pty.openpty()
    try:
        os.write(controller, f"{answer}\n".encode())
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", "dlq", "purge", "--url", redis_url, "-s", stream],
            stdin=terminal,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(controller)
        os.close(terminal)

    assert "Delete 3 entries (all of them)" in result.stderr
    assert result.returncode == (0 if answer == "y" else 1), result.stderr
    assert r.xlen(dead_letter_key(stream)) == left


def test_errors_are_one_line_without_the_password(name: Any) -> None:
    url = "redis://user:sekret@127.0.0.1:1/0"

    result = run("dlq", "ls", "--url", url, "--stream", name("orders"))

    assert_clean_error(result)
    assert "sekret" not in result.stdout + result.stderr


def test_a_bad_argument_is_one_error_line(redis_url: str, name: Any) -> None:
    result = run("dlq", "ls", "--url", redis_url, "--stream", name("orders"), "--after", "x")

    assert_clean_error(result)
    assert "after" in result.stderr


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ((), ("ls", "replay", "purge")),
        (("ls",), ("--stream", "--dead-letter", "--count", "--json", "--url", "REDIS_URL")),
        (
            ("replay",),
            ("--error-contains", "--group", "--origin-id", "--before-ms", "--dry-run", "--limit"),
        ),
        (("purge",), ("--error-contains", "--dry-run", "--yes", "--url")),
    ],
)
def test_help(command: tuple[str, ...], words: tuple[str, ...]) -> None:
    result = run("dlq", *command, "--help")

    assert result.returncode == 0, result.stderr
    for word in words:
        assert word in result.stdout
