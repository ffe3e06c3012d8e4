"""SIGTERM/SIGINT: the first finishes the batch in hand, acks it and leaves the group (exit 0);
a second stops at once and leaves what is unacked pending. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent


def start(
    redis_url: str, stream: str, name: str, driver: str, delay_s: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-X",
            "faulthandler",  # SIGABRT prints every thread's stack: see exit_code()
            "-m",
            "tests.shutdown_worker",
            redis_url,
            stream,
            name,
            driver,
            str(delay_s),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def exit_code(proc: subprocess.Popen[str], timeout_s: float) -> int:
    """The worker's exit code; a worker still running after ``timeout_s`` fails the test with
    the stack of each of its threads (faulthandler on SIGABRT) and the rest of its stderr."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"the worker did not exit within {timeout_s} s:\n{err}") from None


def wait_for(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"worker ended (exit {proc.wait(10)}) before printing {prefix!r}")


@pytest.mark.parametrize("driver", ["sync", "async"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_finishes_the_batch_acks_and_leaves(
    driver: str, sig: signal.Signals, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    for i in range(10):
        r.xadd(s, {"n": str(i)})
    proc = start(redis_url, s, "graceful", driver, 1.0)
    try:
        assert wait_for(proc, "handling") == "handling 10"
        proc.send_signal(sig)
        assert wait_for(proc, "acked") == "acked 10"
        assert wait_for(proc, "left") == "left"
        assert exit_code(proc, 15) == 0
    finally:
        proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr
    assert r.xpending(s, "g")["pending"] == 0
    assert r.xinfo_consumers(s, "g") == []  # left the group


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_second_signal_stops_at_once_and_loses_nothing(
    driver: str, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    for i in range(10):
        r.xadd(s, {"n": str(i)})
    proc = start(redis_url, s, "impatient", driver, 60.0)
    try:
        wait_for(proc, "handling")
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        for line in proc.stderr:  # the first signal was taken: now the second
            if "finishing the batch in hand" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert exit_code(proc, 15) == 0
    finally:
        proc.kill()
    assert r.xpending(s, "g")["pending"] == 10  # unacked, still pending: nothing lost
    assert {c["name"] for c in r.xinfo_consumers(s, "g")} == {b"impatient"}


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_the_grace_period_ends_a_handler_that_does_not_finish(
    driver: str, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    for i in range(10):
        r.xadd(s, {"n": str(i)})
    proc = start(redis_url, s, "stubborn", driver, 60.0)  # the worker's grace period is 5 s
    try:
        wait_for(proc, "handling")
        proc.send_signal(signal.SIGTERM)
        assert exit_code(proc, 20) == 0
    finally:
        proc.kill()
    assert r.xpending(s, "g")["pending"] == 10
