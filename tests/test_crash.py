"""A consumer process SIGKILLed between reading and acking loses nothing: restarted under the
same name, it gets the very same messages again (real processes, real server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent


def start_worker(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.worker", *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )


def first_batch(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"worker exited with {proc.wait(10)} before reporting"
    return list(json.loads(line)["batch"])


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_killed_before_ack_gets_the_same_messages_after_restart(
    driver: str, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    stream = name("s")
    pipe = r.pipeline(transaction=False)
    for i in range(80):
        pipe.xadd(stream, {"n": str(i)})
    pipe.execute()

    doomed = start_worker(redis_url, stream, "g", "worker-7", driver, "hang", "50")
    read = first_batch(doomed)
    assert len(read) == 50
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    assert r.xpending(stream, "g")["pending"] == 50  # nothing was acked, nothing is lost

    again = start_worker(redis_url, stream, "g", "worker-7", driver, "ack", "50")
    reread = first_batch(again)
    assert again.wait(30) == 0
    assert [m["id"] for m in reread] == [m["id"] for m in read]
    assert [m["fields"] for m in reread] == [m["fields"] for m in read]
    assert {m["deliveries"] for m in reread} == {2}
    assert r.xpending(stream, "g")["pending"] == 0
