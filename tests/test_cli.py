"""The ``conveyor`` command line, end to end: real processes, no TTY, CI-like environment."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO

import pytest
import redis

TIMEOUT_S = 20


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "COLUMNS", "LINES")}
    env.update(CI="true", TERM="dumb", PYTHONUNBUFFERED="1", **extra)
    return env


def conveyor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=TIMEOUT_S,
        check=False,
    )


def count(label: str, output: str) -> int:
    """The number on the summary line that starts with ``label``."""
    match = re.search(rf"^{label}\s+(\d+)\b", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return int(match.group(1))


def assert_clean_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def port_is_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_demo_on_the_embedded_server_accounts_for_every_message() -> None:
    result = conveyor("demo", "--messages", "5000", "--consumers", "2")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert count("produced", out) == 5000
    assert count("processed", out) == 5000
    assert count("acked", out) == 5000
    assert count("pending", out) == 0
    assert count("consumers", out) == 2
    assert "msgs/s" in out
    assert "Traceback" not in result.stderr
    match = re.search(r"127\.0\.0\.1:(\d+)", out)
    assert match, out
    assert not port_is_open(int(match.group(1))), "the embedded server was left running"


def test_demo_on_a_given_server_deletes_its_stream(redis_url: str, r: redis.Redis) -> None:
    result = conveyor("demo", "--url", redis_url, "--messages", "2000", "--batch-size", "50")

    assert result.returncode == 0, result.stderr
    assert count("produced", result.stdout) == 2000
    assert count("processed", result.stdout) == 2000
    assert count("pending", result.stdout) == 0
    assert count("consumers", result.stdout) == 4
    match = re.search(r"stream (demo:\w+)", result.stdout)
    assert match, result.stdout
    assert r.exists(match.group(1)) == 0


def test_demo_takes_the_url_from_redis_url(redis_url: str) -> None:
    result = conveyor("demo", "--messages", "100", env=_env(REDIS_URL=redis_url))

    assert result.returncode == 0, result.stderr
    assert redis_url in result.stdout
    assert count("pending", result.stdout) == 0


def test_help_lists_the_commands_and_options() -> None:
    main_help = conveyor("--help")
    demo_help = conveyor("demo", "--help")

    assert main_help.returncode == 0
    for word in ("--version", "--verbose", "demo", "REDIS_URL"):
        assert word in main_help.stdout
    assert demo_help.returncode == 0
    for word in ("--messages", "--consumers", "--batch-size", "--url", "REDIS_URL", "embedded"):
        assert word in demo_help.stdout


def test_version() -> None:
    import conveyor as library

    result = conveyor("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"conveyor {library.__version__}"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:1/0", "cannot connect to redis://127.0.0.1:1/0"),
        ("ftp://x", "scheme 'ftp'"),
        ("redis://x:y@[bad", "cannot parse"),
    ],
)
def test_a_bad_url_is_one_error_line(url: str, says: str) -> None:
    result = conveyor("demo", "--url", url, "--messages", "10")

    assert_clean_error(result)
    assert result.returncode == 1
    assert says in result.stderr


def test_a_bad_option_is_a_usage_error() -> None:
    result = conveyor("demo", "--messages", "0")

    assert result.returncode == 2
    assert "--messages" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("verbose", [(), ("-vv",)])
@pytest.mark.parametrize("via", ["option", "env"])
def test_a_password_is_never_shown(via: str, verbose: Sequence[str]) -> None:
    url = "redis://user:sekret@127.0.0.1:1/0"
    if via == "option":
        result = conveyor(*verbose, "demo", "--url", url, "--messages", "10")
    else:
        result = conveyor(*verbose, "demo", "--messages", "10", env=_env(REDIS_URL=url))

    assert result.returncode == 1
    assert "error: cannot connect to redis://user:***@127.0.0.1:1/0" in result.stderr
    assert "sekret" not in result.stdout + result.stderr
    if not verbose:
        assert_clean_error(result)


# -- interruption -------------------------------------------------------------------------------


class Running:
    """A ``conveyor`` process in its own process group, its output read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or _env(),
            start_new_session=True,
        )
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for name, pipe in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, pipe), daemon=True).start()

    def _pump(self, name: str, pipe: IO[str]) -> None:
        for line in pipe:
            self.lines.put((name, line))
        self.lines.put((name, ""))

    def saw(self, pattern: str) -> re.Match[str]:
        """``pattern`` in a line already read, else in the next lines (stdout and stderr are
        two pipes: which line of the two comes first is not known)."""
        for _, line in self.seen:
            if match := re.search(pattern, line):
                return match
        return self.wait_for(pattern)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                name, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append((name, line))
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"{pattern!r} never printed; output so far: {self.seen}")

    def finish(self) -> tuple[int, str]:
        returncode = self.proc.wait(TIMEOUT_S)
        time.sleep(0.1)  # let the pumps drain the pipes
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return returncode, "".join(line for _, line in self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_until_read(port: int, stream: str, entries: int) -> None:
    """Wait until the demo group has read ``entries`` entries of ``stream``."""
    client = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            groups = client.xinfo_groups(stream)
            if groups and (groups[0]["entries-read"] or 0) >= entries:
                return
            time.sleep(0.02)
    finally:
        client.close()
    raise AssertionError(f"the demo group did not read {entries} entries of {stream}")


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for run in started:
        run.kill()


@pytest.mark.parametrize(
    ("sig", "whole_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_demo_stops_its_consumers_and_server(
    running: list[Running], sig: signal.Signals, whole_group: bool
) -> None:
    # One message per batch: consuming takes long enough to be interrupted midway.
    run = Running("-v", "demo", "--messages", "100000", "--batch-size", "1")
    running.append(run)
    header = run.wait_for(r"stream (demo:\w+) on .*127\.0\.0\.1:(\d+)")
    stream, port = header.group(1), int(header.group(2))
    run.wait_for(r"consuming with 4 consumers")
    wait_until_read(port, stream, 1000)

    if whole_group:  # what a Ctrl-C at a terminal does
        os.killpg(run.proc.pid, sig)
    else:
        run.proc.send_signal(sig)
    returncode, output = run.finish()

    assert returncode == 130, output
    match = re.search(r"interrupted: 100000 of 100000 messages produced, (\d+) processed", output)
    assert match, output
    assert int(match.group(1)) < 100000
    assert "Traceback" not in output
    assert "WARNING" not in output
    assert not port_is_open(port), "the embedded server was left running"
