"""Consumer processes for the crash suite: start, SIGKILL, restart, stop; nothing left behind.

Each incarnation of a worker has its own log, stats, stdout and stderr files, named after the
consumer name and a sequence number (``w2.7.log``), so a restart under the same name never
writes into the log of the process it replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Worker:
    name: str
    seq: int
    proc: subprocess.Popen[bytes]
    log: Path
    stats: Path
    out: Path
    err: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        try:
            return self.out.read_text().startswith("ready ")
        except FileNotFoundError:
            return False

    def read_stats(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.stats.read_text())
        except (FileNotFoundError, ValueError):
            return None
        data["file"] = self.stats.name
        return data

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.err.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Fleet:
    """The worker processes of one scenario."""

    def __init__(self, directory: Path, url: str, stream: str, group: str, args: Sequence[str]):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.stream = stream
        self.group = group
        self.args = list(args)
        self.live: list[Worker] = []
        self.every: list[Worker] = []
        self._seq = 0

    def start(self, name: str, extra: Sequence[str] = ()) -> Worker:
        self._seq += 1
        stem = f"{name}.{self._seq}"
        log, stats = self.dir / f"{stem}.log", self.dir / f"{stem}.stats.json"
        out, err = self.dir / f"{stem}.out", self.dir / f"{stem}.err"
        cmd = [
            sys.executable,
            "-m",
            "tests.chaos.runner",
            "--url",
            self.url,
            "--stream",
            self.stream,
            "--group",
            self.group,
            "--name",
            name,
            "--log",
            str(log),
            "--stats",
            str(stats),
            *self.args,
            *extra,
        ]
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}
        with out.open("wb") as fout, err.open("wb") as ferr:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=fout, stderr=ferr, cwd=ROOT, env=env
            )
        worker = Worker(name, self._seq, proc, log, stats, out, err)
        self.live.append(worker)
        self.every.append(worker)
        return worker

    def wait_ready(self, workers: Sequence[Worker] | None = None, timeout_s: float = 30) -> None:
        workers = list(self.live if workers is None else workers)

        def all_ready() -> bool:
            for w in workers:
                if not w.alive:
                    raise AssertionError(
                        f"worker {w.name}.{w.seq} exited with {w.proc.returncode}:\n"
                        + w.stderr_tail()
                    )
            return all(w.ready() for w in workers)

        wait_until(all_ready, timeout_s, "workers to be ready")

    def kill(self, worker: Worker) -> int:
        """SIGKILL ``worker`` and reap it; returns the wall time of the kill in ms."""
        t = now_ms()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        if worker in self.live:
            self.live.remove(worker)
        return t

    def check_alive(self) -> None:
        for w in self.live:
            if not w.alive:
                raise AssertionError(
                    f"worker {w.name}.{w.seq} died by itself with {w.proc.returncode}:\n"
                    + w.stderr_tail()
                )

    def stop(self, timeout_s: float = 20) -> dict[str, int | None]:
        """Warm stop: SIGTERM every live worker, wait; SIGKILL what is left after the timeout.
        Returns the exit code per worker (None: had to be killed).

        Workers started a moment ago are waited for first: a SIGTERM that arrives while Python
        is still importing ends the process by the signal's default action (exit -15), before
        it has a handler, which says nothing about the worker."""
        self.wait_ready(self.live)
        for w in self.live:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for w in self.live:
            try:
                codes[f"{w.name}.{w.seq}"] = w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(10)
                codes[f"{w.name}.{w.seq}"] = None
        self.live = []
        return codes

    def close(self) -> None:
        """Kill every process this fleet started that still runs."""
        for w in self.every:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(10)
        self.live = []

    def logs(self) -> list[Path]:
        return [w.log for w in self.every]

    def stats(self) -> list[dict[str, Any]]:
        return [s for w in self.every if (s := w.read_stats()) is not None]

    def stderr_warnings(self) -> Iterator[str]:
        for w in self.every:
            with contextlib.suppress(FileNotFoundError):
                for line in w.err.read_text(errors="replace").splitlines():
                    if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                        yield f"{w.name}.{w.seq}: {line}"
