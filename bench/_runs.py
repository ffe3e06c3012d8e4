"""A timed run's pieces that need nothing but the standard library and redis, and the running of
one measurement in a fresh child process.

``python -m bench`` times every run of its consume and produce rows in a child of its own
(``multiprocessing``, spawn: a fresh interpreter), so that no library's imports weigh on
another row's timing (bench/suite.py's docstring says how they would). The child imports this
module, the row's module (bench.suite_consume, as light) and then only the library of its row:
redis for a reference row, conveyor, walrus or faststream for the others.

Here: ``BenchError``; ``Timing`` and ``Stopwatch``; ``Run``, ``Measured`` and the checks of a
run (``finish_run``, ``check_produced``); ``read_entries``; the reference producer
``raw_produce``; ``spawned``, ``answer`` and ``receive``, a spawned child and its answer, for
every benchmark that spawns; ``measure_in_child``, one run of a measurement in a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

import redis

#: XADDs a round trip of the produce rows (a pipeline, or ``send_many``'s chunk)
PRODUCE_CHUNK = 500
#: how long a spawned child may take to start (a fresh interpreter, its imports, its connection)
CHILD_START_TIMEOUT_S = 60.0
#: how long a timed run in a child may take once started: this, plus a millisecond a message
RUN_TIMEOUT_S = 180.0


class BenchError(RuntimeError):
    """A run did not do what it measures: a wrong count, a message lost or read twice, leftover
    pending entries, or a worker or child process that failed."""


class Timing(NamedTuple):
    """Wall-clock and process CPU seconds of one timed run."""

    wall_s: float
    cpu_s: float


class Stopwatch:
    """Wall clock and this process's CPU time, from creation to ``stop()``."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> Timing:
        wall = time.perf_counter() - self._wall
        return Timing(wall, time.process_time() - self._cpu)


@dataclass(frozen=True)
class Run:
    """One timed run: read and ack ``count`` entries of ``stream`` with the new group ``group``
    (a produce run: add ``count`` entries to the new stream ``stream``; no group)."""

    stream: str
    group: str
    batch: int
    count: int
    max_wait_ms: int


class Measured(NamedTuple):
    """One timed run: how many messages its timing covers, and the timing."""

    count: int
    timing: Timing


def read_entries(reply: Any) -> list[Any]:
    """The entries of a one-stream XREADGROUP reply as redis-py returns it (list or dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values())))
    return list(reply[0][1])


def finish_run(admin: redis.Redis, who: str, run: Run, read: int, acked: int) -> None:
    """Check that ``run`` read and acked exactly its count, then drop its group."""
    pending = admin.xpending(run.stream, run.group)["pending"]
    admin.xgroup_destroy(run.stream, run.group)
    if read != run.count or acked != run.count or pending:
        raise BenchError(
            f"{who}: expected {run.count} messages read and acked, got {read} read, "
            f"{acked} acked, {pending} still pending (group {run.group!r})"
        )


def raw_produce(
    r: redis.Redis, admin: redis.Redis, stream: str, rows: list[dict[str, str]]
) -> Timing:
    """Wall and CPU time for pipelined XADD (PRODUCE_CHUNK a round trip) of ``rows``."""
    gc.collect()
    added = 0
    watch = Stopwatch()
    pipe = r.pipeline(transaction=False)
    for start in range(0, len(rows), PRODUCE_CHUNK):
        for row in rows[start : start + PRODUCE_CHUNK]:
            pipe.xadd(stream, row)  # type: ignore[arg-type]
        added += len(pipe.execute())
    elapsed = watch.stop()
    check_produced(admin, "raw produce", stream, len(rows), added)
    return elapsed


def check_produced(admin: redis.Redis, who: str, stream: str, count: int, added: int) -> None:
    """Check that ``stream`` got exactly ``count`` entries, then delete it."""
    length = admin.xlen(stream)
    admin.delete(stream)
    if added != count or length != count:
        raise BenchError(f"{who}: expected {count} entries, got {added} ids and XLEN {length}")


# ---------------------------------------------------------------------------------------------
# Child processes


@contextlib.contextmanager
def spawned(target: Callable[..., None], args: tuple[Any, ...], name: str) -> Iterator[Connection]:
    """A spawned child running ``target(*args, conn)``; yields this end of the pipe.

    Leaving the block waits for the child (30 s at most); a child still running then, or when
    the block fails, is terminated.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
    proc.start()
    child.close()
    try:
        yield parent
        proc.join(30)
    finally:
        parent.close()
        if proc.is_alive():  # only on failure: a child that reported back has ended by now
            proc.terminate()
            proc.join(5)


def answer(conn: Connection, work: Callable[[], Any]) -> None:
    """In a child: send ``("result", work())``, or ``("error", text)`` when it raised."""
    try:
        conn.send(("result", work()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def receive(conn: Connection, timeout_s: float, what: str) -> Any:
    """The child's next answer; a BenchError naming ``what`` when it is an error, or when the
    child says nothing within ``timeout_s`` or ends without a word."""
    if not conn.poll(timeout_s):
        raise BenchError(f"{what}: the child process did not answer within {timeout_s:.0f}s")
    try:
        kind, payload = conn.recv()
    except EOFError:
        raise BenchError(f"{what}: the child process ended without answering") from None
    if kind == "error":
        raise BenchError(f"{what}: {payload}")
    return payload


#: a measurement, ``fn(url, admin, run)``: it sets up its client on ``url``, times ``run``,
#: checks it with ``admin`` and returns (a coroutine function: its coroutine returns) Measured
Measurement = Callable[[str, redis.Redis, Run], "Measured | Awaitable[Measured]"]


def measure_in_child(
    fn: Measurement, url: str, run: Run, what: str, warm: Run | None = None
) -> Measured:
    """``fn(url, admin, run)`` in a new spawned child, ``fn`` sent by its name (a function at
    the top of a module the child can import); what it measured.

    The child's start-up is outside the timing, which ``fn`` does itself; with ``warm``, the
    child first does that untimed run, so the timed one finds its code paths warm (first
    calls, lazy imports, caches). A failure in the child, or no answer in time, is a
    BenchError naming ``what``.
    """
    total = run.count + (warm.count if warm is not None else 0)
    timeout = CHILD_START_TIMEOUT_S + RUN_TIMEOUT_S + total / 1_000
    with spawned(_measure_child, (fn, url, run, warm), f"bench-{fn.__name__}") as conn:
        measured: Measured = receive(conn, timeout, what)
        return measured


def _measure_child(fn: Measurement, url: str, run: Run, warm: Run | None, conn: Connection) -> None:
    # The benchmark's own server keeps nothing (no AOF): the start-up checks' warning about
    # it would be printed again by every child.
    logging.getLogger("conveyor.server").setLevel(logging.ERROR)
    with conn:
        answer(conn, lambda: _measure(fn, url, run, warm))


def _measure(fn: Measurement, url: str, run: Run, warm: Run | None) -> Measured:
    with redis.Redis.from_url(url, decode_responses=True) as admin:
        for each in (warm, run):
            if each is not None:
                result = fn(url, admin, each)
                measured = asyncio.run(result) if inspect.iscoroutine(result) else result
        return measured
