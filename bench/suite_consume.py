"""The consume and produce sections of ``python -m bench``: rows, rounds and their ratios.

What each row measures is written in bench/suite.py's docstring. This module holds the
measurements: the one-round-trip reference loops, conveyor's consumers and producer, walrus and
faststream, each a function ``fn(url, admin, run)`` that sets up its own client, times one run,
checks it and returns what it timed (bench._runs.Measurement). And ``interleave``, which runs
a family of rows in rotating order, round after round, and keeps each row's msg/s and its ratio
to the reference row of its family in the same round.

``interleave`` makes every run, warm-up included, in a fresh child process of its own
(bench._runs.measure_in_child), so that no library's imports weigh on another row's timing
(bench/suite.py's docstring says how they would). The child imports this module and its row's
library, no other: at its top this module imports the standard library, redis and bench._runs
only, and a measurement imports conveyor, walrus or faststream when it runs. The main process
never imports walrus or faststream; whether they are installed it finds with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio

from bench._runs import (
    BenchError,
    Measured,
    Measurement,
    Run,
    Stopwatch,
    Timing,
    finish_run,
    measure_in_child,
    raw_produce,
    read_entries,
)

if TYPE_CHECKING:
    from conveyor import AsyncConsumer, Consumer

NOT_INSTALLED = "not installed (pip install 'conveyor[bench]')"
#: payload of every benchmark entry: five fields, about 100 bytes of values in all
FIELD_VALUE = "x" * 24
#: how long a faststream run may take past its expected time before it counts as stuck
FASTSTREAM_TIMEOUT_S = 120.0


def rows(first: int, count: int) -> Iterator[dict[str, str]]:
    """Entries ``first`` .. ``first + count - 1``: five fields, about 100 bytes of values."""
    v = FIELD_VALUE
    for i in range(first, first + count):
        yield {"i": str(i), "f1": v, "f2": v, "f3": v, "f4": v}


@dataclass
class Row:
    """One row of a comparison: a way of doing the work, and its timed runs.

    ``measurement`` does one run (set-up and checks untimed) and returns what was timed; it
    runs in a child process of its own. None when the library it needs is not installed.
    """

    key: str
    label: str
    family: str
    measurement: Measurement | None
    reference: bool = False
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def add(self, m: Measured) -> None:
        self.rates.append(m.count / m.timing.wall_s)
        self.cpu_us.append(m.timing.cpu_s * 1e6 / m.count)

    @property
    def installed(self) -> bool:
        return self.measurement is not None

    def as_dict(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "label": self.label,
            "family": self.family,
            "reference": self.reference,
            "installed": self.installed,
        }
        if not self.installed:
            return {**base, "note": NOT_INSTALLED}
        return {
            **base,
            "msgs_per_s": [round(x, 1) for x in self.rates],
            "median_msgs_per_s": round(statistics.median(self.rates), 1),
            "ratios": [round(x, 4) for x in self.ratios],
            "ratio": round(statistics.median(self.ratios), 4),
            "ratio_min": round(min(self.ratios), 4),
            "ratio_max": round(max(self.ratios), 4),
            "cpu_us_per_msg": [round(x, 3) for x in self.cpu_us],
            "cpu_us_per_msg_median": round(statistics.median(self.cpu_us), 3),
        }


def progress(text: str) -> None:
    """A progress line on stderr (the report itself may be on stdout)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def library_installed(name: str) -> bool:
    """Whether the library ``name`` can be imported, found without importing it."""
    return importlib.util.find_spec(name) is not None


def interleave(
    table: Sequence[Row],
    repeat: int,
    count: int,
    warm: int,
    what: str,
    url: str,
    new_run: Callable[[int], Run],
) -> None:
    """One untimed warm-up run of ``warm`` messages a row (and one in each child before its
    timed run), then ``repeat`` rounds of every
    installed row, in an order that rotates by one each round; after each round, every row's
    msg/s over its family's reference row's in that round.

    Each run is the row's measurement of ``new_run(n)`` on ``url`` in a new child process; a
    run that fails there is a BenchError naming ``what`` and the row.
    """
    active = [row for row in table if row.installed]
    refs = {row.family: row for row in active if row.reference}

    def measure(row: Row, n: int) -> Measured:
        assert row.measurement is not None
        return measure_in_child(
            row.measurement, url, new_run(n), f"{what}: {row.label}", warm=new_run(warm)
        )

    for row in active:
        measure(row, warm)
    for i in range(repeat):
        started = time.perf_counter()
        k = i % len(active)
        for row in active[k:] + active[:k]:
            row.add(measure(row, count))
        for row in active:
            row.ratios.append(row.rates[-1] / refs[row.family].rates[-1])
        progress(f"{what}: round {i + 1} of {repeat} done in {time.perf_counter() - started:.1f}s")


LABEL_WIDTH = 58
HEADER = f"  {'':<{LABEL_WIDTH}}{'msg/s':>10}{'ratio':>8}   {'per round':<14}{'CPU us/msg':>10}"


def format_row(row: Row) -> str:
    """The row in the readable table: median msg/s, median ratio, per-round ratios, CPU."""
    d = row.as_dict()
    label = f"    {row.label:<{LABEL_WIDTH - 2}}"
    if not row.installed:
        return label + NOT_INSTALLED
    spread = "" if row.reference else f"{d['ratio_min']:.2f}..{d['ratio_max']:.2f}"
    return (
        f"{label}{d['median_msgs_per_s']:>10,.0f}{d['ratio']:>7.2f}x   {spread:<14}"
        f"{d['cpu_us_per_msg_median']:>10.2f}"
    )


# ---------------------------------------------------------------------------------------------
# The reference loops: one round trip a batch, on redis-py alone


class PipelineLoop:
    """The reference loop's bookkeeping and timing, without its I/O.

    Each round trip is one pipeline (``queue`` fills it, ``take`` reads its replies): ``XACK``
    of the previous batch's ids (none the first time) and the next ``XREADGROUP``; once every
    entry has been read, the last batch's ``XACK`` on its own. The clock starts when the loop
    is created and stops in ``finish``.
    """

    def __init__(self, run: Run, who: str) -> None:
        self.run, self.who = run, who
        self.read = self.acked = 0
        self.unacked: list[str] = []
        self.dry = False
        self.queued = (False, False)  # (XACK, XREADGROUP) in the pipeline being run
        gc.collect()
        self.watch = Stopwatch()

    def more(self) -> bool:
        return bool(self.unacked) or self._reading()

    def _reading(self) -> bool:
        return self.read < self.run.count and not self.dry

    def queue(self, pipe: Any) -> Any:
        """Fill ``pipe`` with the next round trip's commands; returns it."""
        run = self.run
        self.queued = (bool(self.unacked), self._reading())
        if self.unacked:
            pipe.xack(run.stream, run.group, *self.unacked)
        if self._reading():
            pipe.xreadgroup(run.group, "ref", {run.stream: ">"}, count=run.batch)
        return pipe

    def take(self, replies: list[Any]) -> None:
        """Read the replies of what ``queue`` put in the pipeline."""
        acking, reading = self.queued
        if acking:
            self.acked += replies[0]
            self.unacked = []
        if reading:
            self.unacked = [entry[0] for entry in read_entries(replies[-1])]
            self.read += len(self.unacked)
            self.dry = not self.unacked

    def finish(self, admin: redis.Redis) -> Measured:
        elapsed = self.watch.stop()
        finish_run(admin, self.who, self.run, self.read, self.acked)
        return Measured(self.run.count, elapsed)


def ref_sync(url: str, admin: redis.Redis, run: Run) -> Measured:
    """The redis-py loop: one pipeline a batch, and the final XACK."""
    with redis.Redis.from_url(url, decode_responses=True) as r:
        r.ping()
        loop = PipelineLoop(run, "redis-py pipeline loop")
        while loop.more():
            loop.take(loop.queue(r.pipeline(transaction=False)).execute())
        return loop.finish(admin)


async def ref_async(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``ref_sync`` on redis.asyncio."""
    async with redis.asyncio.Redis.from_url(url, decode_responses=True) as r:
        await r.ping()
        loop = PipelineLoop(run, "redis.asyncio pipeline loop")
        while loop.more():
            loop.take(await loop.queue(r.pipeline(transaction=False)).execute())
        return loop.finish(admin)


def ref_produce(url: str, admin: redis.Redis, run: Run) -> Measured:
    """redis-py: pipelines of ``XADD`` (bench._runs.raw_produce) to the new stream."""
    data = list(rows(0, run.count))
    with redis.Redis.from_url(url, decode_responses=True) as r:
        r.ping()
        return Measured(run.count, raw_produce(r, admin, run.stream, data))


# ---------------------------------------------------------------------------------------------
# conveyor (imported by the measurements, in their child process)


class AckAll:
    """A ``run()`` handler: acks every message of the batch, stops the consumer after
    ``count`` messages."""

    def __init__(self, consumer: Consumer | AsyncConsumer, count: int) -> None:
        self.consumer, self.count, self.seen = consumer, count, 0

    def __call__(self, batch: Any) -> None:
        for msg in batch:
            batch.ack(msg)
        self.seen += len(batch)
        if self.seen >= self.count:
            self.consumer.stop()


H = TypeVar("H", bound="AckAll")


def timed_run(
    url: str, run: Run, make_handler: Callable[[Consumer, Any], H]
) -> tuple[Consumer, H, Timing]:
    """``Consumer.run(handler)`` timed from the call until it returns (after leaving the
    group); ``make_handler(consumer, client)`` gives the handler."""
    import conveyor

    with conveyor.connect(url) as client:
        client.ping()
        c = conveyor.Consumer(
            client, run.stream, run.group, batch_size=run.batch, max_wait_ms=run.max_wait_ms
        )
        handler = make_handler(c, client)
        gc.collect()
        watch = Stopwatch()
        c.run(handler)
        return c, handler, watch.stop()


def conveyor_run(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``Consumer.run(handler)``: from the call until it returns (after leaving the group)."""
    c, handler, elapsed = timed_run(url, run, lambda c, _: AckAll(c, run.count))
    finish_run(admin, "Consumer.run", run, handler.seen, c.acked_count)
    return Measured(run.count, elapsed)


def check_outputs(admin: redis.Redis, what: str, run: Run, target: str, counted: int) -> None:
    """A stage's run added one entry per message to ``target`` (and counted as many); the
    output is deleted."""
    outputs = admin.xlen(target)
    admin.delete(target)
    if outputs != run.count or counted != run.count:
        raise BenchError(
            f"{what}: {run.count} messages, {outputs} outputs in {target!r}, {counted} counted"
        )


class ForwardAll(AckAll):
    """A ``run()`` handler: forwards every message, its fields as they came, to ``target``
    (``batch.forward``: the ack and the XADD in one script), stops after ``count``."""

    def __init__(self, consumer: Consumer | AsyncConsumer, count: int, target: str) -> None:
        super().__init__(consumer, count)
        self.target = target

    def __call__(self, batch: Any) -> None:
        for msg in batch:
            batch.forward(msg, self.target, msg.fields)
        self.seen += len(batch)
        if self.seen >= self.count:
            self.consumer.stop()


def conveyor_forward(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``Consumer.run(handler)`` of a forwarding stage: as ``conveyor_run``, the handler
    forwarding each message to a new stream in the stream's slot; then checks that the
    output holds exactly one entry per message, and deletes it."""
    target = "{" + run.stream + "}:forwarded:" + run.group
    c, handler, elapsed = timed_run(url, run, lambda c, _: ForwardAll(c, run.count, target))
    finish_run(admin, "Consumer.run forwarding", run, handler.seen, c.acked_count)
    check_outputs(admin, "Consumer.run forwarding", run, target, c.forwarded_count)
    return Measured(run.count, elapsed)


class AckAndSend(AckAll):
    """A ``run()`` handler of a stage written by hand: sends every message's fields to
    ``target`` with one ``Producer.send_many`` a batch, then acks them (at least once: a
    crash between the two sends the batch again), stops after ``count``."""

    def __init__(self, consumer: Consumer | AsyncConsumer, count: int, producer: Any) -> None:
        super().__init__(consumer, count)
        self.producer = producer
        self.sent = 0

    def __call__(self, batch: Any) -> None:
        self.sent += len(self.producer.send_many([msg.fields for msg in batch]))
        super().__call__(batch)


def conveyor_ack_send(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``Consumer.run(handler)`` of an at-least-once stage: as ``conveyor_forward``, the
    handler sending the batch's fields with a Producer, then acking each message."""
    import conveyor

    target = "{" + run.stream + "}:sent:" + run.group

    def sender(c: Consumer, client: Any) -> AckAndSend:
        return AckAndSend(c, run.count, conveyor.Producer(client, target))

    c, handler, elapsed = timed_run(url, run, sender)
    finish_run(admin, "Consumer.run sending", run, handler.seen, c.acked_count)
    check_outputs(admin, "Consumer.run sending", run, target, handler.sent)
    return Measured(run.count, elapsed)


def conveyor_get_batch(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``Consumer.get_batch()`` + ``ack_many(batch)`` (bench.throughput's loop)."""
    import conveyor
    from bench.throughput import conveyor_sync_consume

    with conveyor.connect(url) as client:
        client.ping()
        return Measured(run.count, conveyor_sync_consume(client, admin, run))


async def conveyor_async_run(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``AsyncConsumer.run(handler)``, as ``conveyor_run``."""
    import conveyor

    async with conveyor.connect(url, asyncio=True) as client:
        await client.ping()
        c = conveyor.AsyncConsumer(
            client, run.stream, run.group, batch_size=run.batch, max_wait_ms=run.max_wait_ms
        )
        handler = AckAll(c, run.count)
        gc.collect()
        watch = Stopwatch()
        await c.run(handler)
        elapsed = watch.stop()
    finish_run(admin, "AsyncConsumer.run", run, handler.seen, c.acked_count)
    return Measured(run.count, elapsed)


def conveyor_send_many(url: str, admin: redis.Redis, run: Run) -> Measured:
    """``Producer.send_many(rows, chunk=PRODUCE_CHUNK)`` to the new stream."""
    import conveyor
    from bench.throughput import conveyor_produce

    data = list(rows(0, run.count))
    with conveyor.connect(url) as client:
        client.ping()
        return Measured(run.count, conveyor_produce(client, admin, run.stream, data))


# ---------------------------------------------------------------------------------------------
# Other libraries (optional; imported by the measurements, in their child process)


def walrus_consume(url: str, admin: redis.Redis, run: Run) -> Measured:
    """walrus: ``ConsumerGroup.read(count=batch)``, then ``ack(*ids)`` of what came."""
    import walrus

    with walrus.Database.from_url(url, decode_responses=True) as db:
        db.ping()
        cg = db.consumer_group(run.group, [run.stream], consumer="walrus")
        stream = cg.streams[run.stream]
        read = acked = 0
        gc.collect()
        watch = Stopwatch()
        while read < run.count:
            entries = read_entries(cg.read(count=run.batch))
            if not entries:
                break
            ids = [entry[0] for entry in entries]
            acked += stream.ack(*ids)
            read += len(ids)
        elapsed = watch.stop()
    finish_run(admin, "walrus", run, read, acked)
    return Measured(run.count, elapsed)


async def faststream_consume(url: str, admin: redis.Redis, run: Run) -> Measured:
    """faststream: a batch subscriber (``StreamSub(batch=True, max_records=batch)``) on a new
    RedisBroker, its handler acks the batch (``AckPolicy.MANUAL``, ``await msg.ack()``).

    Timed from the first handler call to the end of the last one; the first batch's read
    happens before the timing starts, so the messages counted are those of the later batches.
    """
    from faststream import AckPolicy, Context
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(url, logger=None)
    done = asyncio.Event()
    state = {"read": 0, "acked": 0, "first_batch": 0}
    marks: list[float] = []
    sub = StreamSub(run.stream, group=run.group, consumer="fs", batch=True, max_records=run.batch)

    @broker.subscriber(stream=sub, ack_policy=AckPolicy.MANUAL)
    async def handle(body: Any, msg: Any = Context("message")) -> None:  # noqa: B008
        if not marks:
            marks.extend((time.perf_counter(), time.process_time()))
            state["first_batch"] = len(body)
        await msg.ack()
        state["read"] += len(body)
        state["acked"] += len(msg.raw_message["message_ids"])
        if state["read"] >= run.count:
            marks.extend((time.perf_counter(), time.process_time()))
            done.set()

    gc.collect()
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), FASTSTREAM_TIMEOUT_S + run.count / 5_000)
    except TimeoutError:
        raise BenchError(
            f"faststream: {state['read']} of {run.count} messages handled in time"
        ) from None
    finally:
        await broker.stop()
    finish_run(admin, "faststream", run, state["read"], state["acked"])
    timing = Timing(marks[2] - marks[0], marks[3] - marks[1])
    return Measured(run.count - state["first_batch"], timing)
