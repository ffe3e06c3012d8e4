"""The scripts in docs/examples, run as real processes against the test server: fed entries,
their output checked, stopped with SIGTERM (exit code 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.workers import fill, wait_for

Name = Callable[[str], str]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


class Script:
    """One example running in a process of its own; its stdout lines are collected."""

    def __init__(self, name: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit code and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def scripts() -> Iterator[Callable[..., Script]]:
    started: list[Script] = []

    def start(name: str, *args: str) -> Script:
        script = Script(name, *args)
        started.append(script)
        return script

    yield start
    for script in started:
        script.kill()


def pending(r: redis.Redis, stream: str, group: str) -> int:
    return int(r.xpending(stream, group)["pending"])


def test_streamz_batches_to_file_writes_batches_and_acks_only_what_is_written(
    redis_url: str,
    r: redis.Redis,
    name: Name,
    tmp_path: Path,
    scripts: Callable[..., Script],
) -> None:
    s = name("s")
    out = tmp_path / "batches.jsonl"
    ids = fill(r, s, 25)

    def batches() -> list[list[dict[str, Any]]]:
        text = out.read_text() if out.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    args = ["--url", redis_url, "--stream", s, "--group", "g", "--consumer", "c1"]
    args += ["--out", str(out), "--every", "10"]
    first = scripts("streamz_batches_to_file.py", *args, "--seconds", "600")
    wait_for(lambda: len(batches()) == 2, what="two full batches")
    wait_for(lambda: pending(r, s, "g") == 5, what="the two batches acked")
    code, err = first.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert pending(r, s, "g") == 5  # the five of the unfinished batch were never written

    second = scripts("streamz_batches_to_file.py", *args, "--seconds", "0.2")
    wait_for(lambda: len(batches()) == 3, what="the partial batch, after --seconds")
    ids += fill(r, s, 10, kind="more")
    wait_for(lambda: len(batches()) == 4, what="a batch of the new entries")
    wait_for(lambda: pending(r, s, "g") == 0, what="everything acked")
    code, err = second.stop()
    assert code == 0, err

    written = batches()
    assert [len(b) for b in written] == [10, 10, 5, 10]
    assert [row["id"] for b in written for row in b] == ids
    assert written[0][0] == {"stream": s, "id": ids[0], "data": {"n": "0"}}
    assert written[3][0]["data"] == {"n": "0", "kind": "more"}
    assert r.xinfo_consumers(s, "g") == []  # stopped owning nothing: it left the group


def test_tail_with_checkpoint_prints_entries_and_resumes_after_its_checkpoint(
    redis_url: str, r: redis.Redis, name: Name, scripts: Callable[..., Script]
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    args = ["--url", redis_url, "--stream", s, "--name", "t", "--start", "0"]

    def printed(script: Script) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(script.lines)]

    first = scripts("tail_with_checkpoint.py", *args)
    wait_for(lambda: len(first.lines) == 5, what="the five entries printed")
    ids += fill(r, s, 3, kind="live")
    wait_for(lambda: len(first.lines) == 8, what="entries added while it runs")
    code, err = first.stop()
    assert code == 0, err
    assert "Traceback" not in err
    shown = printed(first)
    assert [e["id"] for e in shown] == ids
    assert shown[0] == {"stream": s, "id": ids[0], "data": {"n": "0"}}
    assert shown[5]["data"] == {"n": "0", "kind": "live"}

    later = fill(r, s, 4, kind="while stopped")
    second = scripts("tail_with_checkpoint.py", *args)
    wait_for(lambda: len(second.lines) == 4, what="the entries added while it was stopped")
    code, err = second.stop()
    assert code == 0, err
    assert [e["id"] for e in printed(second)] == later  # only those: resumed at its checkpoint
