"""``conveyor demo``: a batch pipeline end to end on an embedded server, with a summary."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import click
import redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

import conveyor
from conveyor._keys import dead_letter_key
from conveyor.cli import (
    EXIT_INTERRUPTED,
    _sigterm_as_interrupt,
    _start_embedded_server,
    main,
    open_client,
    redis_options,
)
from conveyor.connection import redact_url

log = logging.getLogger("conveyor.cli.demo")

# -- demo --------------------------------------------------------------------------------------

_DEMO_GROUP = "demo"
_DEMO_PAYLOAD = "x" * 64
_DEMO_SEND_BLOCK = 2_000  # rows per send_many call: the progress bar moves between calls
_DEMO_MAX_WAIT_MS = 200
_DEMO_JOIN_S = _DEMO_MAX_WAIT_MS / 1000 + 15.0


class _RateColumn(ProgressColumn):
    """Average messages per second since the task started."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed:
            return Text("", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.0f} msgs/s", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class _Tally:
    """What the demo has done so far; consumer threads add under one lock, and ``done`` is set
    when the target is reached (or a consumer failed, or the demo is stopping)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.produced = 0
        self.processed = 0
        self.acked = 0
        self.finished_at: float | None = None
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def add(self, processed: int, acked: int) -> None:
        with self._lock:
            self.processed += processed
            self.acked += acked
            if self.processed >= self.target and self.finished_at is None:
                self.finished_at = time.perf_counter()
                self.done.set()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)
        self.done.set()


def _consume(consumer: conveyor.Consumer, tally: _Tally) -> None:
    """One consumer thread: read a batch, process it, ack it, until the tally is done."""
    try:
        checksum = 0
        while not tally.done.is_set():
            batch = consumer.get_batch()
            if not batch:
                continue
            checksum += sum(int(msg.fields["n"]) for msg in batch)  # the "processing"
            tally.add(len(batch), consumer.ack_many(batch))
        log.debug("consumer %s done, checksum %d", consumer.name, checksum)
    except Exception as exc:
        tally.fail(exc)
    finally:
        consumer.close()


@dataclass(frozen=True)
class _DemoResult:
    produced: int
    produce_s: float
    processed: int
    acked: int
    consume_s: float
    pending: int
    consumers: int
    batch_size: int

    @property
    def ok(self) -> bool:
        return self.pending == 0 and self.processed == self.produced


def _produce(client: redis.Redis, stream: str, tally: _Tally, progress: Progress) -> float:
    producer = conveyor.Producer(client, stream)
    task = progress.add_task("produce", total=tally.target)
    started = time.perf_counter()
    for first in range(0, tally.target, _DEMO_SEND_BLOCK):
        last = min(tally.target, first + _DEMO_SEND_BLOCK)
        producer.send_many({"n": i, "payload": _DEMO_PAYLOAD} for i in range(first, last))
        tally.produced = last
        progress.update(task, completed=last)
    elapsed = time.perf_counter() - started
    log.info("produced %d messages to %s in %.2f s", tally.produced, stream, elapsed)
    return elapsed


def _consume_all(
    client: redis.Redis,
    stream: str,
    tally: _Tally,
    *,
    consumers: int,
    batch_size: int,
    progress: Progress,
) -> float:
    group = [
        conveyor.Consumer(
            client, stream, _DEMO_GROUP, batch_size=batch_size, max_wait_ms=_DEMO_MAX_WAIT_MS
        )
        for _ in range(consumers)
    ]
    threads = [
        threading.Thread(target=_consume, args=(c, tally), name=f"demo-{c.name}", daemon=True)
        for c in group
    ]
    task = progress.add_task("consume", total=tally.target)
    log.info("consuming with %d consumers, batch size %d", consumers, batch_size)
    started = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        while not tally.done.wait(0.1):
            progress.update(task, completed=tally.processed)
            if not any(t.is_alive() for t in threads):
                break
        progress.update(task, completed=tally.processed)
    finally:
        # Also on Ctrl-C: each consumer finishes and acks the batch in hand, then leaves.
        tally.done.set()
        deadline = time.monotonic() + _DEMO_JOIN_S
        for consumer, thread in zip(group, threads, strict=True):
            if thread.ident is None:  # interrupted before it started
                consumer.close()
            else:
                thread.join(max(0.0, deadline - time.monotonic()))
        progress.update(task, completed=tally.processed)
    if tally.errors:
        raise tally.errors[0]
    return (tally.finished_at or time.perf_counter()) - started


def _pending(client: redis.Redis, stream: str) -> int:
    summary: Any = client.xpending(stream, _DEMO_GROUP)
    return int(summary["pending"])


def _print_summary(result: _DemoResult) -> None:
    """Aligned plain lines on stdout: the same in a terminal, a pipe or a CI log."""
    r = result
    width = len(str(max(r.produced, r.processed, r.acked, r.pending)))

    def timing(count: int, seconds: float) -> str:
        rate = f", {count / seconds:.0f} msgs/s" if seconds > 0 else ""
        return f" in {seconds:.2f} s{rate}"

    rows = [
        ("produced", r.produced, timing(r.produced, r.produce_s)),
        ("processed", r.processed, timing(r.processed, r.consume_s)),
        ("acked", r.acked, ""),
        ("pending", r.pending, ""),
        ("consumers", r.consumers, f" (batch size {r.batch_size})"),
    ]
    for label, count, note in rows:
        click.echo(f"{label:<10} {count:>{width}}{note}")
    if r.ok:
        click.echo(f"{'result':<10} OK: every message was processed and acknowledged")
    else:
        click.echo(
            f"{'result':<10} FAILED: {r.produced - r.processed} messages not processed, "
            f"{r.pending} still pending"
        )


@main.command()
@click.option(
    "--messages",
    metavar="N",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="How many messages to produce, then consume.",
)
@click.option(
    "--consumers",
    metavar="N",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Consumers in the group, each in its own thread.",
)
@click.option(
    "--batch-size",
    metavar="N",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="Most messages one get_batch() returns.",
)
@redis_options(fallback="an embedded Valkey server, started for the demo and stopped after it")
@click.pass_context
def demo(
    ctx: click.Context, messages: int, consumers: int, batch_size: int, url: str | None
) -> None:
    """Produce messages, consume them with a consumer group, and check that none is left.

    The messages go to a new stream with a unique name (demo:<random>), consumed by a group
    named "demo". On a server of yours (--url or REDIS_URL) the stream is deleted at the end;
    without one, an embedded Valkey server runs the demo: no Redis installation needed.

    Exit code 0 when every message was processed and nothing is left pending, 1 otherwise,
    130 when interrupted (Ctrl-C or SIGTERM: the consumers finish their batch and leave).

    \b
    Example:
      conveyor demo --messages 10000 --consumers 8 --batch-size 200
    """
    tally = _Tally(messages)
    try:
        with _sigterm_as_interrupt():
            result = _run_demo(url, tally, consumers, batch_size)
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: {tally.produced} of {messages} messages produced, "
            f"{tally.processed} processed",
            err=True,
        )
        ctx.exit(EXIT_INTERRUPTED)
    _print_summary(result)
    ctx.exit(0 if result.ok else 1)


def _run_demo(url: str | None, tally: _Tally, consumers: int, batch_size: int) -> _DemoResult:
    stream = f"demo:{uuid.uuid4().hex[:12]}"
    server = _start_embedded_server() if url is None else None
    client: redis.Redis | None = None
    try:
        where = (
            f"an embedded {server.binary.name} at {server.url}" if server else redact_url(url or "")
        )
        client = open_client(server.url if server else url)
        click.echo(
            f"conveyor demo: {tally.target} messages to stream {stream} on {where}, "
            f"{consumers} consumers in group {_DEMO_GROUP!r}"
        )
        with _progress(Console(stderr=True, highlight=False)) as progress:
            produce_s = _produce(client, stream, tally, progress)
            consume_s = _consume_all(
                client, stream, tally, consumers=consumers, batch_size=batch_size, progress=progress
            )
        return _DemoResult(
            produced=tally.produced,
            produce_s=produce_s,
            processed=tally.processed,
            acked=tally.acked,
            consume_s=consume_s,
            pending=_pending(client, stream),
            consumers=consumers,
            batch_size=batch_size,
        )
    finally:
        try:
            if client is not None:
                _close_client(client, stream, delete_stream=server is None)
        finally:
            if server is not None:
                server.close()


def _close_client(client: redis.Redis, stream: str, *, delete_stream: bool) -> None:
    try:
        if delete_stream:  # a server of the user's: leave nothing behind
            client.delete(stream, dead_letter_key(stream))
    except RedisError as exc:
        log.warning("could not delete demo stream %s: %s", stream, exc)
    finally:
        client.close()
